"""swa-20m-lm: the sliding-window baseline (swa-20m's 11 layers, 19.6M parameters) on drt-20m-lm's data,
learning rates and steps: with the same overrides it trains on the same batches (the data stream does
not depend on the model)."""

import dataclasses
import pathlib

from drt_jax.train.config import load_run_config

_DRT = load_run_config(str(pathlib.Path(__file__).with_name("drt-20m-lm.py")))
_SWA = load_run_config(str(pathlib.Path(__file__).with_name("swa-20m.py")))

RUN = dataclasses.replace(_DRT, name="swa-20m-lm", model=_SWA.model)
