"""drt-20m-2hop: the 2-hop NIAH model of issue 9 (spec 7.3): drt-20m with two retrieval groups.

decoder (4, 2, 2): 4 lower layers, then two groups of 2 upper layers, each group with its own
retrieval. The second group's query has passed through the first group. In segment 10 that did
not matter: both groups fetched both needle chunks at top-8 (recall 1.00). The question chunk's
landmark reads only the retrieval made by the chunk before it, so it cannot yet know the first hop's
answer. The parameter count equals drt-20m's (the same 8 decoder
layers, plus one landmark norm). Fine-tuned like drt-20m-niah (75% NIAH, 25% python-all, answer
tokens weighted 20) on `niah_2hop` examples. It does not learn 2-hop from random weights (segment
9). It does learn it from segment 8's single-passkey model, re-cut into these groups by `python -m
drt_jax.train.bundle regroup` and started with `segment.py --init-bundle`. Segment 10 did that: 315
tokens, window 128, top-3 (every chunk the answer chunk cannot see is retrieved) for 1,500 steps,
then 4K, top-8. It answered 70% at 1M (experiments/README.md, docs/results.md).
"""

import dataclasses
import pathlib

from drt_jax.train.config import load_run_config

_BASE = load_run_config(str(pathlib.Path(__file__).with_name("drt-20m-niah.py")))

MODEL = _BASE.model.replace(name="drt-20m-2hop", decoder_layers=(4, 2, 2))
RUN = dataclasses.replace(
    _BASE,
    name="drt-20m-2hop",
    model=MODEL,
    data=dataclasses.replace(_BASE.data, mixture=(("niah_2hop", 0.75),), corpus_weight=0.25),
)
