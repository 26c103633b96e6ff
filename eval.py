#!/usr/bin/env python
"""Evaluate DRT checkpoints: `python eval.py {ppl,niah,generate,retrieval} --checkpoint RUN ...`.

See drt_jax/evaluate/cli.py (`python eval.py -h`)."""

import sys

from drt_jax.evaluate.cli import main

if __name__ == "__main__":
    sys.exit(main())
