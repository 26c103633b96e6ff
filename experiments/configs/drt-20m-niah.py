"""drt-20m-niah: NIAH fine-tuning (spec 7.4) of a pretrained drt-20m, the second stage of issue 9's recipe.

The model of drt-20m.py, started from its pretraining checkpoint (train.init_from, or segment.py's
--init-bundle) and trained on 75% NIAH-single examples and 25% python-all language modelling, at 4,096
tokens per sequence, with 4 grain workers (one in-process reader kept the H100 at about 340K tokens/s). Every example's haystack is language-model loss too (the authors' fine-tuning); the
answer tokens are weighted 20 so that their gradient is not lost among 4,096 targets.
"""

import dataclasses
import pathlib

from drt_jax.train.config import load_run_config

_BASE = load_run_config(str(pathlib.Path(__file__).with_name("drt-20m.py")))

RUN = dataclasses.replace(
    _BASE,
    name="drt-20m-niah",
    data=dataclasses.replace(_BASE.data, mixture=(("niah_single", 0.75),), corpus_weight=0.25,
                             num_workers=4, niah_align="chunk"),
    optim=dataclasses.replace(_BASE.optim, peak_lr=1e-3, end_lr=1e-4, warmup_fraction=0.02),
    train=dataclasses.replace(_BASE.train, steps=1800, checkpoint_every=300),
)
