#!/usr/bin/env python
"""The loss head's log-normaliser alone: the reference (XLA's one-read reduction) against the Pallas
kernel (pallas_kernels.logsumexp) at each tiling: rows a program, tile bytes, Triton warps and stages.
With --op gradient, the log-normaliser with the cross-entropy's gradient
(`softmax_grad_pallas_gpu`, one read and one write of the logits) against the reference (XLA) and
against the path it replaces in the loss (the log-normaliser kernel, then XLA's gradient pass).

The input is one block of the loss head's logits: [batch, block, Vp] in the stored dtype, by default
drt-133m's at 16K x 4 with 1,024-token blocks ([4, 1024, 50304] bfloat16, the vocabulary of 50,265
padded to a multiple of 128; the padded columns do not count). Each case is checked against the
reference (largest absolute difference) and timed over --repeats back-to-back calls after a warm-up
call; GB/s counts one read of the logits (and one write of the gradient with --op gradient).

    PYTHONPATH=. python bench/log_normaliser.py                                     # the default sweep
    PYTHONPATH=. python bench/log_normaliser.py --rows 4 8 --tile-bytes 8192 --warps 8 --stages 2 3
    PYTHONPATH=. python bench/log_normaliser.py --op gradient --rows 1 2 --tile-bytes 8192 16384 --warps 8 --stages 3 --programs 0 256

On a backend without the kernel (a CPU) only the reference is timed, unless --interpret runs the kernel
under the Pallas interpreter (a check of the options, not a timing). Prints a table, fastest first,
and writes bench/results/log_normaliser.json (or --out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from train_throughput import header  # noqa: E402


def _time(fn, args, repeats: int) -> float:
    """Seconds a call, the mean of `repeats` calls dispatched back to back after one warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(repeats)]
    jax.block_until_ready(outs)
    return (time.perf_counter() - t0) / repeats


def main(argv=None) -> None:
    import functools

    import jax
    import jax.numpy as jnp

    from pallas_kernels import logsumexp as lse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=("lse", "gradient"), default="lse",
                        help="the log-normaliser alone, or with the cross-entropy's gradient")
    parser.add_argument("--shape", nargs=3, type=int, default=[4, 1024, 50304], metavar=("BATCH", "BLOCK", "VP"))
    parser.add_argument("--valid", type=int, default=50265, help="columns that count (the vocabulary)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    # From the default's 4 rows in 4 KiB tiles to one row a program in 64 KiB tiles with 32 warps, the
    # layout of row-wise Triton cross-entropy kernels (a 50K vocabulary in one or two tiles).
    parser.add_argument("--rows", nargs="*", type=int, default=[1, 4])
    parser.add_argument("--tile-bytes", nargs="*", type=int, default=[4096, 16384, 65536])
    parser.add_argument("--warps", nargs="*", type=int, default=[4, 8, 16, 32])
    parser.add_argument("--stages", nargs="*", type=int, default=[1, 3])
    parser.add_argument("--programs", nargs="*", type=int, default=[0],
                        help="with --op gradient: at most this many programs, each walking several row blocks (0: one a block)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--interpret", action="store_true", help="run the kernel under the Pallas interpreter")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "log_normaliser.json"))
    args = parser.parse_args(argv)
    if args.valid > args.shape[2]:
        parser.error(f"--valid {args.valid} exceeds the padded width {args.shape[2]}; lower it or widen --shape")

    try:
        tilings = [lse.Tiling(*t) for t in itertools.product(args.rows, args.tile_bytes, args.warps, args.stages, args.programs)]
    except ValueError as e:
        parser.error(str(e))
    if args.op != "gradient" and args.programs != [0]:
        parser.error("--programs is the gradient kernel's: add --op gradient")

    x = (4.0 * jax.random.normal(jax.random.PRNGKey(0), tuple(args.shape), jnp.float32)).astype(args.dtype)
    gigabytes = x.size * x.dtype.itemsize / 1e9 * (2 if args.op == "gradient" else 1)
    if args.op == "gradient":
        targets = jax.random.randint(jax.random.PRNGKey(1), tuple(args.shape[:2]), 0, args.valid)
        weights = jnp.ones(tuple(args.shape[:2]), jnp.float32)
        operands = (x, targets, weights)
        kwargs = {"valid": args.valid, "out_dtype": x.dtype}
        kernel_fn, reference_fn = lse.softmax_grad_pallas_gpu, lse.softmax_grad_reference

        def before(x, t, w):
            """The loss's path before the gradient kernel: the log-normaliser kernel, then XLA's pass."""
            m = lse.logsumexp_pallas_gpu(x, args.valid, interpret=args.interpret)
            return m, lse.softmax_grad_given_lse(x, m, t, w, args.valid, x.dtype)
    else:
        operands, kwargs = (x,), {"valid": args.valid}
        kernel_fn, reference_fn, before = lse.logsumexp_pallas_gpu, lse.logsumexp_reference, None
    reference = jax.jit(functools.partial(reference_fn, **kwargs))
    want = reference(*operands)
    result = {**header(argv), "op": args.op, "shape": args.shape, "valid": args.valid, "dtype": args.dtype, "cases": []}
    result["command"] = result["command"].replace("train_throughput.py", "log_normaliser.py")

    def save():  # after every case, so a failure keeps the rows before it
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))

    def record(name, tiling, fn):
        pairs = zip(jax.tree.leaves(fn(*operands)), jax.tree.leaves(want), strict=True)
        err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))) for g, w in pairs)
        s = _time(fn, operands, args.repeats)
        result["cases"].append({"impl": name, "tiling": tiling, "ms": 1e3 * s, "gb_per_s": gigabytes / s, "max_abs_err": err})
        save()

    record("reference", None, reference)
    if jax.default_backend() == "gpu" or args.interpret:
        if before is not None:
            record("lse+xla", None, jax.jit(before))
        for tiling in tilings:
            fn = jax.jit(functools.partial(kernel_fn, **kwargs, interpret=args.interpret, tiling=tiling))
            try:
                record("pallas_gpu", vars(tiling), fn)
            except Exception as e:  # noqa: BLE001 - a tiling Triton cannot compile is a row of the table
                result["cases"].append({"impl": "pallas_gpu", "tiling": vars(tiling), "error": f"{type(e).__name__}: {str(e)[:200]}"})
    else:
        print(f"no kernel on {jax.default_backend()}: the reference only (--interpret runs the kernel's options)")
    save()

    moved = "a read and a write" if args.op == "gradient" else "a read"
    print(f"{result['device']}  jax {result['jax']}  {result['date']}  {args.op}: logits {args.dtype}{args.shape}, {gigabytes:.3f} GB {moved}")
    print(f"{'impl':<11} {'rows':>4} {'tile B':>7} {'warps':>5} {'stages':>6} {'progs':>5} {'ms':>8} {'GB/s':>7} {'max err':>9}")
    default = vars(lse.DEFAULT_GRAD_TILING if args.op == "gradient" else lse.DEFAULT_TILING)
    for c in sorted(result["cases"], key=lambda c: c.get("ms", float("inf"))):
        t = c["tiling"] or {}
        cols = (f"{t.get('rows', '-'):>4} {t.get('tile_bytes', '-'):>7} {str(t.get('num_warps', '-')):>5} "
                f"{str(t.get('num_stages', '-')):>6} {str(t.get('programs', '-')):>5}")
        tail = c["error"] if "error" in c else f"{c['ms']:>8.3f} {c['gb_per_s']:>7.0f} {c['max_abs_err']:>9.2e}"
        mark = "  (default)" if t == default else ""
        print(f"{c['impl']:<11} {cols} {tail}{mark}")


if __name__ == "__main__":
    main()
