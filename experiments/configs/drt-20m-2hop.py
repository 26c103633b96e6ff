"""drt-20m-2hop: the 2-hop NIAH model of issue 9 (spec 7.3): drt-20m with two retrieval groups.

decoder (4, 2, 2): 4 lower layers, then two groups of 2 upper layers, each group with its own
retrieval. The second group's query has passed through the first group, so it can ask for the chunk
that the first hop's answer points to. The parameter count equals drt-20m's (the same 8 decoder
layers, plus one landmark norm). Fine-tuned like drt-20m-niah (75% NIAH, 25% python-all, answer
tokens weighted 20) on `niah_2hop` examples, from a drt-20m-2hop pretraining bundle
(`segment.py --init-bundle`). Not run yet. The read-out curriculum of experiments/README.md applies
here too. The 2-hop task needs at least 315 tokens (5 chunks), so a first stage would use
`data.seq_len=315 model.window=128 model.top_k=3`, retrieving every chunk that the answer's chunk
cannot see.
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
