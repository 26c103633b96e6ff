"""drt-20m-lm: language-model pretraining of drt-20m on python-all alone, for the perplexity comparison
with its sliding-window baseline (swa-20m-lm.py, which draws the same batches).

The model of segment 8 (drt-20m with the standard GCA residual and Gumbel noise at 0.5); no NIAH
examples, every token a language-model target; 4,096 tokens per sequence, batch 16 (65K tokens/step).
"""

import dataclasses
import pathlib

from drt_jax.train.config import load_run_config

_BASE = load_run_config(str(pathlib.Path(__file__).with_name("drt-20m.py")))

RUN = dataclasses.replace(
    _BASE,
    name="drt-20m-lm",
    model=_BASE.model.replace(gca_residual="standard", gumbel_scale=0.5),
    data=dataclasses.replace(_BASE.data, mixture=(), corpus_weight=1.0, num_workers=8),
    train=dataclasses.replace(_BASE.train, steps=3000, checkpoint_every=250),
)
