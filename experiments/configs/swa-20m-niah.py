"""swa-20m-niah: the sliding-window baseline run on drt-20m-niah's data (75% NIAH-single, 25% python-all,
answer tokens weighted 20), with swa-20m's model (11 sliding-window layers, 19.6M parameters).

Given the same overrides, stages and `train.stop_at_step` as a DRT segment, it trains on the same
batches in the same order with the same learning rates (the data stream does not depend on the
model), which is what the issue's baseline "on the same tokens" needs (experiments/README.md).
"""

import dataclasses
import pathlib

from drt_jax.train.config import load_run_config

_DRT = load_run_config(str(pathlib.Path(__file__).with_name("drt-20m-niah.py")))
_SWA = load_run_config(str(pathlib.Path(__file__).with_name("swa-20m.py")))

RUN = dataclasses.replace(_DRT, name="swa-20m-niah", model=_SWA.model)
