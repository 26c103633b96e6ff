"""Inference benchmark: decode ms/token and device memory vs context, prefill tokens/s.

    PYTHONPATH=. python bench/inference.py [--contexts 4K,16K,64K,256K,1M] [--budget-s 330] [--out FILE]

Models: drt-133m (chunk memory on the device, and offloaded to host) and full-133m (full-attention KV
cache), bf16 weights and compute, batch 1, random weights. Decode is timed from a synthetic state at each
context length (ring buffers / caches and chunk memory filled with placeholder values, positions set
to the context), over 2 chunks of steps, best of 3 runs (so chunk-boundary work - encoder, retrieval over all chunks,
top-k fetch - is included), feeding the argmax back on the device. The chunk memory capacity is the one
for the largest context in every run (a worst case for the retrieval scoring at short contexts).
Prefill: real segment prefill of a fresh prompt of --prefill-tokens (e.g. 16M with
--skip drt,offload,full,prefill-device,16m for the full 16M-token run with host offload); the "16m"
section estimates 16M from timed segments on a state holding ~16M tokens of memory. Needs no grain.
Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from drt_jax.config import ModelConfig  # noqa: E402
from drt_jax.inference import InferenceEngine, InferenceState  # noqa: E402
from drt_jax.model import DRT  # noqa: E402
from drt_jax.train.loop import git_commit  # noqa: E402

T0 = time.time()


def parse_len(s):
    s = s.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(s[-1], 1)
    return int(s[:-1] if s[-1] in "KM" else s) * mult


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def init_params(cfg):
    tokens = jnp.zeros((1, 2 * cfg.slots_per_chunk), jnp.int32)
    import flax.linen as nn

    return jax.jit(lambda k: nn.unbox(DRT(cfg).init(k, tokens)["params"]))(jax.random.PRNGKey(0))


def mem_in_use():
    try:
        st = jax.devices()[0].memory_stats() or {}
        return int(st.get("bytes_in_use", -1)), int(st.get("peak_bytes_in_use", -1))
    except Exception:  # noqa: BLE001
        return -1, -1


def synthetic_state(eng: InferenceEngine, ntok: int, capacity: int) -> InferenceState:
    cfg = eng.cfg
    st = eng.init_state(max_chunks=capacity)
    if cfg.uses_retrieval:
        E = ntok // cfg.chunk_size
        lmk = jax.random.normal(jax.random.PRNGKey(1), st.dev.mem_lmk.shape, st.dev.mem_lmk.dtype)
        dev = st.dev.replace(mem_lmk=lmk)
        pos = E * cfg.slots_per_chunk
        return InferenceState(dev, pos=pos, ntok=ntok, n_chunks=E, host=st.host)
    return InferenceState(st.dev, pos=ntok, ntok=ntok, n_chunks=0)


def time_decode(eng, st, steps):
    tok = jnp.zeros((eng.B,), jnp.int32)
    warm = eng.cfg.chunk_size + 1 if eng.cfg.uses_retrieval else 4
    for _ in range(warm):  # compiles both step kinds
        lg, st = eng.step(st, tok)
        tok = jnp.argmax(lg, -1).astype(jnp.int32)
    lg.block_until_ready()
    best = float("inf")
    for _ in range(3):  # host dispatch and launch gaps vary by tenths of a ms between runs: the best of 3
        t = time.perf_counter()
        for _ in range(steps):
            lg, st = eng.step(st, tok)
            tok = jnp.argmax(lg, -1).astype(jnp.int32)
        lg.block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best / steps * 1e3, st


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4K,16K,64K,256K,1M")
    ap.add_argument("--budget-s", type=float, default=330.0)
    ap.add_argument("--out", default="bench/results/inference.json")
    ap.add_argument("--prefill-tokens", default="64K")
    ap.add_argument("--small", action="store_true", help="CPU smoke test with tiny models")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: drt,offload,full,prefill,prefill-device,prefill-host,16m")
    args = ap.parse_args()
    contexts = [parse_len(c) for c in args.contexts.split(",")]
    skip = set(args.skip.split(","))
    deadline = T0 + args.budget_s
    res = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "jax": jax.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "decode": [], "prefill": [],
           "notes": []}
    res["commit"] = git_commit()

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)

    bf = dict(dtype="bfloat16", param_dtype="bfloat16", gumbel_noise=False)
    drt = ModelConfig.from_preset("drt-133m", **bf)
    full = ModelConfig.from_preset("full-133m", **bf)
    if args.small:
        drt = ModelConfig.from_preset("tiny", **bf)
        full = drt.replace(name="full-tiny", arch="full", window=None, decoder_layers=(2,), encoder_layers=0)
    S = drt.chunk_size
    cap = max(contexts) // S + 8
    log("init drt params")
    p_drt = init_params(drt)

    for mode in ("device", "host"):
        if ("drt" if mode == "device" else "offload") in skip:
            continue
        eng = InferenceEngine(drt, p_drt, offload=None if mode == "device" else "host", memory_block=cap)
        for n in contexts:
            if time.time() > deadline - 60:
                res["notes"].append(f"drt {mode} decode at {n} skipped: budget")
                continue
            n = (n // S) * S
            try:
                st = synthetic_state(eng, n, cap)
                ms, st = time_decode(eng, st, 2 * S)
                used, peak = mem_in_use()
                matched = jax.eval_shape(lambda n=n, eng=eng: eng.init_state(max_chunks=n // S + 2).dev)
                state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(matched))
                row = {"model": "drt-133m", "memory": mode, "context": n, "ms_per_token": round(ms, 3),
                       "device_bytes_in_use": used, "state_device_bytes_at_context": state_bytes,
                       "host_bytes": st.host.nbytes if st.host is not None else 0}
                res["decode"].append(row)
                log(row)
                del st
            except Exception as err:  # noqa: BLE001
                res["notes"].append(f"drt {mode} decode at {n} failed: {type(err).__name__}: {str(err)[:200]}")
                log("FAILED", res["notes"][-1])
            save()
        del eng

    if "prefill" not in skip:
        seg = 256  # chunks per segment = 16128 tokens
        n = (parse_len(args.prefill_tokens) // (seg * S)) * seg * S
        for mode in ("device", "host"):
            if f"prefill-{mode}" in skip:
                continue
            if time.time() > deadline - 40:
                res["notes"].append(f"drt prefill {mode} skipped: budget")
                continue
            try:
                eng = InferenceEngine(drt, p_drt, offload=None if mode == "device" else "host", segment_chunks=seg,
                                      memory_block=n // S + 8)
                toks = np.random.default_rng(0).integers(0, 50000, (1, n)).astype(np.int32)
                lg, _ = eng.prefill(eng.init_state(), toks[:, : 2 * seg * S], align=False)  # compile both segment kinds
                lg.block_until_ready()
                t = time.perf_counter()
                lg, st = eng.prefill(eng.init_state(), toks, align=False)
                lg.block_until_ready()
                dt = time.perf_counter() - t
                row = {"model": "drt-133m", "memory": mode, "tokens": n, "seconds": round(dt, 3),
                       "tokens_per_s": round(n / dt), "segment_tokens": seg * S}
                res["prefill"].append(row)
                log(row)
                del st
            except Exception as err:  # noqa: BLE001
                res["notes"].append(f"drt prefill {mode} failed: {type(err).__name__}: {str(err)[:200]}")
                log("FAILED", res["notes"][-1])
            save()

            if mode == "host" and "16m" not in skip and time.time() < deadline - 30:
                # Segments on a state that already holds ~16M tokens of memory (host K/V left uninitialised).
                try:
                    big = (16 * 1024 * 1024 if not args.small else 16384) // S
                    eng = InferenceEngine(drt, p_drt, offload="host", segment_chunks=seg, memory_block=big + 2 * seg)
                    st = eng.init_state()
                    E0 = big - 4 * seg
                    lmk = jax.random.normal(jax.random.PRNGKey(2), st.dev.mem_lmk.shape, st.dev.mem_lmk.dtype)
                    st = InferenceState(st.dev.replace(mem_lmk=lmk), pos=E0 * (S + 1), ntok=E0 * S, n_chunks=E0,
                                        host=st.host)  # np.zeros: pages untouched until used
                    lg, st = eng.prefill(st, toks[:, : seg * S], align=False)
                    lg.block_until_ready()
                    t = time.perf_counter()
                    lg, st = eng.prefill(st, toks[:, : 2 * seg * S], align=False)
                    lg.block_until_ready()
                    dt_big = (time.perf_counter() - t) / 2
                    small = [r for r in res["prefill"] if r.get("memory") == "host" and r["model"] == "drt-133m"]
                    dt_small = small[-1]["seconds"] / (small[-1]["tokens"] / (seg * S)) if small else dt_big
                    n_seg = (16 * 1024 * 1024) // (seg * S)
                    est = n_seg * (dt_small + dt_big) / 2  # per-segment cost grows ~linearly with memory size
                    row = {"model": "drt-133m", "memory": "host", "tokens": 16 * 1024 * 1024,
                           "estimated_seconds": round(est, 1), "segment_seconds_at_16M": round(dt_big, 3),
                           "segment_seconds_at_start": round(dt_small, 3), "estimated": True}
                    res["prefill"].append(row)
                    log(row)
                except Exception as err:  # noqa: BLE001
                    res["notes"].append(f"16M estimate failed: {type(err).__name__}: {str(err)[:200]}")
                    log("FAILED", res["notes"][-1])
                save()

    if "full" not in skip:
        p_full = init_params(full)
        for n in contexts:
            if time.time() > deadline - 45:
                res["notes"].append(f"full decode at {n} skipped: budget")
                continue
            try:
                eng = InferenceEngine(full, p_full, max_len=n + 64)
                st = synthetic_state(eng, n, 0)
                ms, st = time_decode(eng, st, 32)
                used, _ = mem_in_use()
                row = {"model": "full-133m", "memory": "device", "context": n, "ms_per_token": round(ms, 3),
                       "device_bytes_in_use": used, "state_device_bytes_at_context": st.device_bytes()}
                res["decode"].append(row)
                log(row)
                del st, eng
            except Exception as err:  # noqa: BLE001
                res["notes"].append(f"full decode at {n} failed: {type(err).__name__}: {str(err)[:200]}")
                log("FAILED", res["notes"][-1])
            save()
        if "prefill" not in skip and time.time() < deadline - 40:
            for n in (16384, 65536):
                try:
                    eng = InferenceEngine(full, p_full, max_len=n + 64)
                    toks = np.random.default_rng(0).integers(0, 50000, (1, n)).astype(np.int32)
                    lg, _ = eng.prefill(eng.init_state(), toks, align=False)
                    lg.block_until_ready()
                    t = time.perf_counter()
                    lg, _ = eng.prefill(eng.init_state(), toks, align=False)
                    lg.block_until_ready()
                    dt = time.perf_counter() - t
                    row = {"model": "full-133m", "tokens": n, "seconds": round(dt, 3), "tokens_per_s": round(n / dt)}
                    res["prefill"].append(row)
                    log(row)
                    del eng
                except Exception as err:  # noqa: BLE001
                    res["notes"].append(f"full prefill {n} failed: {type(err).__name__}: {str(err)[:200]}")
                save()
        del p_full

    print_table(res)
    save()


def print_table(res):
    print(f"\ndevice: {res['device']}  jax {res['jax']}  commit {res.get('commit')}")
    print(f"{'model':10s} {'memory':7s} {'context':>9s} {'ms/token':>9s} {'dev MiB in use':>15s} {'state MiB @ctx':>15s} {'host MiB':>9s}")
    for r in res["decode"]:
        print(f"{r['model']:10s} {r['memory']:7s} {r['context']:>9d} {r['ms_per_token']:>9.2f} "
              f"{r['device_bytes_in_use'] / 2**20:>15.0f} {r['state_device_bytes_at_context'] / 2**20:>15.1f} "
              f"{r.get('host_bytes', 0) / 2**20:>9.0f}")
    for r in res["prefill"]:
        print("prefill", r)
    for n in res["notes"]:
        print("note:", n)


if __name__ == "__main__":
    main()
