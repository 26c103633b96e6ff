"""full-133m: the full-causal-attention baseline (12 layers, no window, no retrieval).

drt-133m's width, MLP, vocabulary and run settings (123.6M parameters).
"""

from drt_jax.config import ModelConfig
from drt_jax.train.config import load_run_config

MODEL = ModelConfig.from_preset("drt-133m").replace(
    name="full-133m", arch="full", decoder_layers=(12,), encoder_layers=0, window=None
)

_BASE = load_run_config("drt-133m")
RUN = _BASE.replace(name=MODEL.name, model=MODEL.replace(dtype=_BASE.model.dtype, remat=_BASE.model.remat))
