"""swa-133m: the BaseLM baseline: 12 Llama layers with a 512-slot sliding window, no retrieval.

drt-133m's width, MLP, vocabulary and run settings (123.6M parameters). For the "average attention
field" comparison of the paper, override model.window=768.
"""

from drt_jax.config import ModelConfig
from drt_jax.train.config import load_run_config

MODEL = ModelConfig.from_preset("drt-133m").replace(name="swa-133m", arch="swa", decoder_layers=(12,), encoder_layers=0)

_BASE = load_run_config("drt-133m")
RUN = _BASE.replace(name=MODEL.name, model=MODEL.replace(dtype=_BASE.model.dtype, remat=_BASE.model.remat))
