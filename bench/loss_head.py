#!/usr/bin/env python
"""The tied loss head alone: forward and backward of drt_jax.losses.blocked_cross_entropy.

hidden [1, T, d] in bf16, a float32 embedding [V, d] (drt-133m's: d 768, V 50,265), random targets,
every token scored. Times value_and_grad with respect to hidden and embedding (the step's loss head),
after one compile/warm-up call, for each block size. TFLOP/s counts the four vocabulary-wide GEMMs of
a blocked head that recomputes its logits (8 T d V), so a head that needs only three shows as faster.

    PYTHONPATH=. python bench/loss_head.py                        # T 16K and 64K, blocks 1K/2K/4K
    PYTHONPATH=. python bench/loss_head.py --tokens 16384 --blocks 1024 --repeats 20
    PYTHONPATH=. python bench/loss_head.py --tokens 16384 --blocks 4096 --logits-dtype float32 bfloat16

Prints a table and writes bench/results/loss_head.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from train_throughput import header  # noqa: E402


def time_case(tokens: int, block: int, d: int, vocab: int, repeats: int, logits_dtype: str = "float32") -> dict:
    import jax
    import jax.numpy as jnp

    from drt_jax.losses import blocked_cross_entropy

    kh, ke, kt = jax.random.split(jax.random.PRNGKey(0), 3)
    hidden = jax.random.normal(kh, (1, tokens, d), jnp.bfloat16)
    embedding = 0.02 * jax.random.normal(ke, (vocab, d), jnp.float32)
    targets = jax.random.randint(kt, (1, tokens), 0, vocab)
    mask = jnp.ones((1, tokens), jnp.float32)

    def loss(h, e):
        return blocked_cross_entropy(h, e, targets, mask, block_size=block, logits_dtype=logits_dtype)[0]

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(hidden, embedding))
    compile_s = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        value, _ = jax.block_until_ready(fn(hidden, embedding))
        best = min(best, time.perf_counter() - t0)
    flops = 8.0 * tokens * d * vocab
    return {"tokens": tokens, "block": block, "logits_dtype": logits_dtype, "ms": 1e3 * best, "tflops_per_s": flops / best / 1e12,
            "compile_s": compile_s, "loss": float(value)}


def main(argv=None) -> None:
    from drt_jax.losses import LOGITS_DTYPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", nargs="*", type=int, default=[16384, 65536])
    parser.add_argument("--blocks", nargs="*", type=int, default=[1024, 2048, 4096])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50265)
    parser.add_argument("--logits-dtype", nargs="*", default=["float32"], choices=LOGITS_DTYPES,
                        help="the dtype the head stores its logits in (train.loss_logits_dtype); each is timed")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per case; the best is kept")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "loss_head.json"))
    args = parser.parse_args(argv)

    result = {**header(argv), "d_model": args.d_model, "vocab": args.vocab, "cases": []}
    result["command"] = result["command"].replace("train_throughput.py", "loss_head.py")
    print(f"{'tokens':>7} {'block':>6} {'logits':>8} {'ms':>8} {'TFLOP/s':>8} {'loss':>8}")
    for tokens in args.tokens:
        for block in args.blocks:
            for dtype in args.logits_dtype:
                row = time_case(tokens, block, args.d_model, args.vocab, args.repeats, dtype)
                result["cases"].append(row)
                print(f"{tokens:>7} {block:>6} {dtype:>8} {row['ms']:>8.2f} {row['tflops_per_s']:>8.1f} {row['loss']:>8.4f}",
                      flush=True)
            pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
