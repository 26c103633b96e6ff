"""GCA kernel benchmark (a script, not a test): correctness first, then timings and memory.

  PYTHONPATH=. python bench/gca_kernels.py [--quick] [--out bench/results/gca_kernels.json]

1. Correctness on this device: every impl against the reference (fp32 oracle, no tf32) on the small
   test cases and at every bench shape (bf16, with empty slots), outputs poisoned with NaN.
2. Device ceilings measured here: device-to-device copy bandwidth (bytes read + written) and bf16
   matmul rate (8192^3).
3. For every impl (and the XLA reference) at the paper's shapes (H=Hkv=12, D=64, Sq=Sm=64, K=8,
   C = M = 256 and 1024 chunks, batch 1 and 4, bf16): median time of forward, backward (the vjp
   alone) and forward+backward; achieved TB/s and TFLOP/s against the ceilings; extra device memory
   (XLA's compiled temp allocation, i.e. beyond inputs and outputs). Byte count: q and out once,
   each retrieved chunk's K and V once per query chunk that retrieved it; backward: q, dO, dq once,
   K, V and dK, dV once per retrieval. FLOPs: 4 N forward, 10 N backward, N = B C K H Sq Sm D.
4. Extra memory of fwd+bwd at K = 8, 16, 32 (64K tokens, batch 1), compiled only.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pallas_kernels import poison  # noqa: E402
from pallas_kernels.gca.api import Unsupported, _resolve  # noqa: E402
from tests.gca_testing import Case, check_against_reference  # noqa: E402

IMPLS = ["reference", "pallas_gpu", "triton"]
H, D, SQ, SM, K = 12, 64, 64, 64, 8


def log(*a):
    print(*a, flush=True)


def timeit(fn, *args, iters=10, reps=7):
    out = fn(*args)
    jax.block_until_ready(out)  # compile + warm-up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / iters)
    return statistics.median(times), (max(times) - min(times))


def ceilings():
    small = jax.default_backend() == "cpu"  # smoke runs only
    x = jax.random.normal(jax.random.key(0), (8 if small else 512, 1024, 1024), jnp.bfloat16)  # 1 GiB
    copy = jax.jit(lambda x: x * jnp.bfloat16(1.5))
    t, _ = timeit(copy, x, iters=10, reps=5)
    bw = 2 * x.nbytes / t
    del x
    n = 1024 if small else 8192
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    t, _ = timeit(mm, a, b, iters=10, reps=5)
    return bw, 2 * n**3 / t


def bench_inputs(B, C, seed=0):
    M = C
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, C, SQ, H, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, M, SM, H, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, M, SM, H, D), jnp.bfloat16)
    # K distinct chunks per query chunk (top-k of random scores), no empty slots.
    idx = jnp.argsort(jax.random.uniform(ks[3], (B, C, M)), axis=-1)[..., :K].astype(jnp.int32)
    w = jax.nn.softmax(jax.random.normal(ks[4], (B, C, K)), axis=-1)
    ct = jax.random.normal(ks[5], q.shape, jnp.bfloat16)
    return q, k, v, idx, w, ct


def counts(B, C, Kk=K):
    n = B * C * Kk * H * SQ * SM * D
    qb = B * C * SQ * H * D * 2
    kvb = B * C * Kk * SM * H * D * 2  # one of K or V, per retrieval
    fwd_bytes = 2 * qb + 2 * kvb
    bwd_bytes = 3 * qb + 4 * kvb
    return dict(fwd=(4 * n, fwd_bytes), bwd=(10 * n, bwd_bytes), fwdbwd=(14 * n, fwd_bytes + bwd_bytes))


def make_fns(fn):
    def fwd(q, k, v, idx, w):
        return fn(q, k, v, idx, w, softmax_off_by_one=True)

    def fwdbwd(q, k, v, idx, w, ct):
        out, vjp = jax.vjp(lambda q, k, v, w: fwd(q, k, v, idx, w), q, k, v, w)
        return out, vjp(ct)

    return jax.jit(fwd), jax.jit(fwdbwd)


def temp_bytes(jitted, *args):
    ma = jitted.lower(*args).compile().memory_analysis()
    return int(getattr(ma, "temp_size_in_bytes", -1)) if ma is not None else -1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only batch 1, 16K tokens")
    ap.add_argument("--out", default="bench/results/gca_kernels.json")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time num_warps/num_stages variants")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated impls to check and time")
    ap.add_argument("--shapes", default="", help="e.g. 1x1024,4x256 (batch x chunks); default all four")
    ap.add_argument("--no-memory-vs-k", action="store_true")
    args = ap.parse_args()
    dev = jax.devices()[0]
    res = dict(device=str(dev.device_kind), jax=jax.__version__, checks=[], timings=[], memory_vs_k=[])
    log("device", dev.device_kind, "jax", jax.__version__)

    impls = {}
    for name in args.impls.split(","):
        try:
            impls[name] = _resolve(name)
        except Unsupported as why:
            log(f"impl {name} unavailable: {why}")
            res.setdefault("unavailable", {})[name] = str(why)

    # 1. correctness
    shapes = [(1, 256), (1, 1024), (4, 256), (4, 1024)] if not args.quick else [(1, 256)]
    if args.shapes:
        shapes = [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")]
    if jax.default_backend() == "cpu":  # smoke run of the script itself
        shapes = [(1, 16)]
    if not args.skip_check:
        from tests.test_gca_kernels import GPU_CASES

        bench_cases = [Case(B=B, C=C, Sq=SQ, H=H, D=D, M=C, Sm=SM - 1 if C == 256 else SM, Hkv=H, K=K,
                            dtype="bfloat16", obo=True) for B, C in shapes]
        poison.POISON_OUTPUTS = True
        for name in impls:
            if name == "reference":
                continue
            for case in [*GPU_CASES, *bench_cases]:
                try:
                    errs, tol, seed = check_against_reference(impls[name], case)
                    tol = max(tol, 2e-5)
                    ok = all(e <= tol for e in errs.values())
                except Exception as err:  # noqa: BLE001
                    errs, tol, seed, ok = {"error": repr(err)[:400]}, None, None, False
                    traceback.print_exc()
                res["checks"].append(dict(impl=name, case=str(case), ok=ok, errs=errs, tol=tol, seed=seed))
                log(f"check {name:10s} {str(case):60s} {'OK ' if ok else 'BAD'} "
                    + " ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in errs.items()))
        poison.POISON_OUTPUTS = False
        bad = sorted({c["impl"] for c in res["checks"] if not c["ok"]})
        for name in bad:
            log(f"impl {name} FAILED correctness: not timed")
            impls.pop(name)
        res["failed_correctness"] = bad

    # 2. ceilings
    bw, mm = ceilings()
    res["ceilings"] = dict(copy_TBps=bw / 1e12, bf16_matmul_TFLOPs=mm / 1e12)
    log(f"ceilings: copy {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {mm / 1e12:.0f} TFLOP/s")

    # 3. timings
    for B, C in shapes:
        q, k, v, idx, w, ct = bench_inputs(B, C)
        kv_bytes = k.nbytes + v.nbytes
        cnt = counts(B, C)
        for name, fn in impls.items():
            row = dict(impl=name, B=B, C=C, tokens=C * SQ, K=K)
            try:
                jf, jfb = make_fns(fn)
                jb = jax.jit(lambda vjp, ct: vjp(ct))
                for kind in ("fwd", "fwdbwd", "bwd"):
                    if kind == "fwd":
                        t, spread = timeit(jf, q, k, v, idx, w)
                    elif kind == "fwdbwd":
                        t, spread = timeit(jfb, q, k, v, idx, w, ct)
                    else:  # the vjp alone, its residuals computed once outside the timing
                        _, vjp = jax.vjp(lambda q, k, v, w, fn=fn, idx=idx: fn(q, k, v, idx, w), q, k, v, w)
                        t, spread = timeit(jb, vjp, ct)
                        del vjp
                    fl, by = cnt[kind]
                    row[kind] = dict(ms=t * 1e3, spread_ms=spread * 1e3, TBps=by / t / 1e12, TFLOPs=fl / t / 1e12)
                row["temp_bytes_fwd"] = temp_bytes(jf, q, k, v, idx, w)
                row["temp_bytes_fwdbwd"] = temp_bytes(jfb, q, k, v, idx, w, ct)
                row["kv_bytes"] = kv_bytes
                row["extra_mem_ratio"] = row["temp_bytes_fwdbwd"] / kv_bytes
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                row["error"] = repr(err)[:400]
            res["timings"].append(row)
            log(json.dumps(row))
        del q, k, v, idx, w, ct

    # 3b. launch-config sweep (64K tokens, batch 1): num_warps / num_stages of the GPU kernels
    if args.sweep and not args.quick and jax.default_backend() == "gpu":
        import importlib

        q, k, v, idx, w, ct = bench_inputs(1, 1024)
        mods = {"pallas_gpu": "pallas_kernels.gca.pallas_gpu", "triton": "pallas_kernels.gca.triton_gpu"}
        for name in [n for n in impls if n in mods]:
            mod = importlib.import_module(mods[name])
            default = (mod.NUM_WARPS, mod.NUM_STAGES)
            for nw, ns in ((4, 1), (4, 2), (4, 3), (8, 2), (8, 3)):
                mod.NUM_WARPS, mod.NUM_STAGES = nw, ns
                try:
                    jf, jfb = make_fns(impls[name])
                    tf, _ = timeit(jf, q, k, v, idx, w)
                    tfb, _ = timeit(jfb, q, k, v, idx, w, ct)
                    res.setdefault("sweep", []).append(dict(impl=name, num_warps=nw, num_stages=ns,
                                                            fwd_ms=tf * 1e3, fwdbwd_ms=tfb * 1e3))
                    log(f"sweep {name} warps={nw} stages={ns}: fwd {tf * 1e3:.3f} ms, fwd+bwd {tfb * 1e3:.3f} ms")
                except Exception as err:  # noqa: BLE001
                    log(f"sweep {name} warps={nw} stages={ns}: {err!r}"[:300])
            mod.NUM_WARPS, mod.NUM_STAGES = default
        del q, k, v, idx, w, ct

    # 4. extra memory at larger K (compile only), 64K tokens, batch 1
    if not args.quick and not args.no_memory_vs_k:
        for Kk in (8, 16, 32):
            C = shapes[-1][1]
            sds = lambda s, d: jax.ShapeDtypeStruct(s, d)  # noqa: E731
            a = (sds((1, C, SQ, H, D), jnp.bfloat16), sds((1, C, SM, H, D), jnp.bfloat16),
                 sds((1, C, SM, H, D), jnp.bfloat16), sds((1, C, Kk), jnp.int32), sds((1, C, Kk), jnp.float32),
                 sds((1, C, SQ, H, D), jnp.bfloat16))
            kvb = 2 * C * SM * H * D * 2
            for name, fn in impls.items():
                try:
                    tb = temp_bytes(make_fns(fn)[1], *a)
                    res["memory_vs_k"].append(dict(impl=name, K=Kk, temp_bytes=tb, ratio=tb / kvb))
                    log(f"memory K={Kk} {name}: extra {tb / 2**20:.1f} MiB = {tb / kvb:.2f} x size(k)+size(v)")
                except Exception as err:  # noqa: BLE001
                    log(f"memory K={Kk} {name}: {err!r}"[:300])

    # table
    log("\n| impl | B | tokens | fwd ms | bwd ms | fwd+bwd ms | fwd TB/s | fwd TFLOP/s | fwd+bwd TB/s | "
        "fwd+bwd TFLOP/s | extra mem / (k+v) |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["timings"]:
        if "error" in r:
            log(f"| {r['impl']} | {r['B']} | {r['tokens']} | error: {r['error'][:80]} |")
            continue
        log(f"| {r['impl']} | {r['B']} | {r['tokens']} | {r['fwd']['ms']:.3f} | {r['bwd']['ms']:.3f} | "
            f"{r['fwdbwd']['ms']:.3f} | {r['fwd']['TBps']:.2f} | {r['fwd']['TFLOPs']:.0f} | "
            f"{r['fwdbwd']['TBps']:.2f} | {r['fwdbwd']['TFLOPs']:.0f} | {r['extra_mem_ratio']:.2f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    log("wrote", args.out)


if __name__ == "__main__":
    main()
