"""Host input pipeline throughput: can it feed the train step, and at what sequence length?

For each sequence length, builds the trainer's own iterator (build_train_iterator: packed corpus windows,
shuffle, task mixture, batching) at a fixed number of tokens per batch and counts batches for
--seconds after --warmup batches. Prints a table (tokens/s, batches/s, task examples/s) and writes
bench/results/data_pipeline.json (or --out). Compare tokens/s with the train step's on the GPU: the
pipeline is the limit only where it is the smaller number.

  python bench/data_pipeline.py --corpus default --lengths 512,2048,4096 --workers 0
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from drt_jax.data import build_train_iterator, load_tokenizer  # noqa: E402
from drt_jax.data.config import DataConfig  # noqa: E402
from drt_jax.data.shards import split_tokens  # noqa: E402
from drt_jax.tasks.niah import register_niah_tasks  # noqa: E402
from drt_jax.train.loop import HAYSTACK_TOKENS, git_commit  # noqa: E402


def measure(cfg: DataConfig, seconds: float, warmup: int) -> dict:
    it = build_train_iterator(cfg, progress=False)
    for _ in range(warmup):
        next(it)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    dt = time.perf_counter() - t0
    task_share = sum(w for _, w in cfg.mixture) / (sum(w for _, w in cfg.mixture) + cfg.corpus_weight)
    return {"seq_len": cfg.seq_len, "batch": cfg.batch_size, "workers": cfg.num_workers,
            "batches_per_s": n / dt, "tokens_per_s": n * cfg.batch_size * cfg.seq_len / dt,
            "task_examples_per_s": n * cfg.batch_size * task_share / dt}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default="default")
    p.add_argument("--lengths", default="512,2048,4096")
    p.add_argument("--tokens-per-batch", type=int, default=65536)
    p.add_argument("--mixture", default="niah_single:0.75", help="task:weight[,task:weight]; empty for none")
    p.add_argument("--corpus-weight", type=float, default=0.25)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "data_pipeline.json"))
    args = p.parse_args(argv)
    mixture = tuple((name, float(w)) for name, w in (item.split(":") for item in args.mixture.split(",") if item))
    # NIAH haystacks as the trainer registers them: the corpus's training split, chunk size 63.
    base = DataConfig(corpus=args.corpus)
    register_niah_tasks(chunk_size=63, haystack=split_tokens(base, load_tokenizer(base.tokenizer), "train", HAYSTACK_TOKENS),
                        overwrite=True)
    rows = []
    print(f"{'seq':>6} {'batch':>6} {'workers':>7} {'batches/s':>10} {'tokens/s':>12} {'task ex/s':>10}")
    for length in (int(x) for x in args.lengths.split(",")):
        cfg = DataConfig(corpus=args.corpus, seq_len=length, batch_size=max(1, args.tokens_per_batch // length),
                         mixture=mixture, corpus_weight=args.corpus_weight, num_workers=args.workers)
        r = measure(cfg, args.seconds, args.warmup)
        rows.append(r)
        print(f"{r['seq_len']:>6} {r['batch']:>6} {r['workers']:>7} {r['batches_per_s']:>10.1f} "
              f"{r['tokens_per_s']:>12,.0f} {r['task_examples_per_s']:>10,.0f}", flush=True)
    result = {"host": platform.node(), "cpus": os.cpu_count(), "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
              "corpus": args.corpus, "mixture": mixture, "corpus_weight": args.corpus_weight, "rows": rows}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
