"""Scaling of the sharded train step over the GPUs of one host: data-parallel and FSDP meshes.

For each GPU count n (1, 2, 4, 8 up to what the host has) and layout (data: mesh data=n; fsdp: mesh
fsdp=n), trains `--preset` (default drt-355m) at `--seq-len` tokens per sequence with one sequence
per GPU (weak scaling) for a fixed number of steps, and reports tokens/s per GPU, scaling efficiency
against 1 GPU, the step-time breakdown (GPU time in NCCL collectives vs other kernels, from a
jax.profiler trace of the timed steps) and peak memory per GPU. Prints a table and writes
bench/results/scaling.json (or --out).

  NCCL_NVLS_ENABLE=0 PYTHONPATH=. python bench/scaling.py --gpus 1,2 --steps 5
On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=8 and --preset tiny --seq-len 256 check the
script itself (no profile breakdown there).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast (NVLS) off unless set: NCCL_NVLS_ENABLE=1 turns it on

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from drt_jax.config import ModelConfig  # noqa: E402
from drt_jax.train import mesh as mesh_lib  # noqa: E402
from drt_jax.train.config import MeshConfig, OptimConfig  # noqa: E402
from drt_jax.train.metrics import train_flops_per_sequence  # noqa: E402
from drt_jax.train.optim import make_optimizer  # noqa: E402
from drt_jax.train.step import init_state, make_train_step, state_spec  # noqa: E402


def peak_memory_per_device(devices) -> float | None:
    peaks = [d.memory_stats().get("peak_bytes_in_use") for d in devices if d.memory_stats()]
    return max(peaks) / 2**30 if peaks else None


def profile_breakdown(trace_dir: str, n_steps: int) -> dict | None:
    """Per-step GPU time in NCCL kernels vs other kernels, averaged over the GPUs."""
    files = list(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
    if not files:
        return None
    data = jax.profiler.ProfileData.from_file(str(files[0]))
    comm, compute, gpus = 0, 0, 0
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        gpus += 1
        for line in plane.lines:
            if "stream" not in line.name.lower():
                continue
            for event in line.events:
                if "nccl" in event.name.lower():
                    comm += event.duration_ns
                else:
                    compute += event.duration_ns
    if not gpus:
        return None
    scale = 1e-6 / (gpus * n_steps)
    return {"collective_ms": comm * scale, "compute_ms": compute * scale}


def run_one(cfg: ModelConfig, n: int, layout: str, seq_len: int, steps: int, warmup: int) -> dict:
    devices = jax.devices()[:n]
    mesh_cfg = MeshConfig(data=n, fsdp=1, tensor=1) if layout == "data" else MeshConfig(data=1, fsdp=n, tensor=1)
    mesh = mesh_lib.make_mesh(mesh_cfg, devices)
    rules = mesh_cfg.rules
    tx, schedule = make_optimizer(OptimConfig(), 1000)
    spec = state_spec(cfg, tx, mesh, rules)
    state = init_state(cfg, tx, spec, seed=0)
    sharding = mesh_lib.batch_sharding(mesh, rules)
    step = make_train_step(cfg, tx, schedule, spec, sharding, grad_accum=1, block_size=4096)
    rng = np.random.default_rng(0)

    def batch():
        tokens = rng.integers(0, cfg.vocab_size - 8, size=(n, seq_len), dtype=np.int32)
        return {"tokens": jax.device_put(tokens, sharding), "mask": jax.device_put(np.ones_like(tokens), sharding)}

    t0 = time.perf_counter()
    for _ in range(warmup):
        state, metrics = step(state, batch())
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    batches = [batch() for _ in range(steps)]
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            t0 = time.perf_counter()
            for b in batches:
                state, metrics = step(state, b)
            jax.block_until_ready(metrics)
            step_s = (time.perf_counter() - t0) / steps
        breakdown = profile_breakdown(trace_dir, steps)
    tokens_per_s = n * seq_len / step_s
    return {
        "gpus": n, "layout": layout, "step_s": step_s, "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / n, "warmup_s": compile_s, "loss": float(metrics["loss"]),
        "peak_gib_per_gpu": peak_memory_per_device(devices),
        "model_tflops_per_gpu": train_flops_per_sequence(cfg, seq_len) / step_s / 1e12,
        **(breakdown or {"collective_ms": None, "compute_ms": None}),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="drt-355m")
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--gpus", default="1,2,4,8", help="GPU counts; those above the host's are skipped")
    ap.add_argument("--layouts", default="data,fsdp")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--remat", default="full")
    ap.add_argument("--out", default="bench/results/scaling.json")
    args = ap.parse_args(argv)
    cfg = ModelConfig.from_preset(args.preset, dtype="bfloat16", remat=args.remat)
    counts = [int(x) for x in args.gpus.split(",") if int(x) <= jax.device_count()]
    rows = []
    single = None  # on 1 GPU every layout is the same program: run it once
    for layout in args.layouts.split(","):
        for n in counts:
            if n == 1 and single is not None:
                rows.append({**single, "layout": layout})
                continue
            try:
                row = run_one(cfg, n, layout, args.seq_len, args.steps, args.warmup)
            except Exception as err:  # an OOM or a failed compile is a recorded miss, not a crash
                row = {"gpus": n, "layout": layout, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            rows.append(row)
            if n == 1:
                single = row
            print(json.dumps(row), flush=True)
    base = {r["layout"]: r["tokens_per_s_per_gpu"] for r in rows if r.get("gpus") == 1 and "error" not in r}
    for r in rows:
        if "error" not in r and r["layout"] in base:
            r["efficiency"] = r["tokens_per_s_per_gpu"] / base[r["layout"]]
    print(f"\n{args.preset}, {args.seq_len} tokens/sequence, 1 sequence per GPU, {jax.devices()[0].device_kind}")
    print(f"{'layout':6} {'GPUs':>4} {'step s':>8} {'tok/s/GPU':>10} {'eff.':>6} {'comm ms':>8} {'compute ms':>10} {'peak GiB':>9}")
    fmt = lambda v, f: "n/a" if v is None else format(v, f)
    for r in rows:
        if "error" in r:
            print(f"{r['layout']:6} {r['gpus']:>4} MISS: {r['error']}")
            continue
        print(f"{r['layout']:6} {r['gpus']:>4} {r['step_s']:8.3f} {r['tokens_per_s_per_gpu']:10.0f} "
              f"{fmt(r.get('efficiency'), '6.1%'):>6} {fmt(r['collective_ms'], '8.1f'):>8} "
              f"{fmt(r['compute_ms'], '10.1f'):>10} {fmt(r['peak_gib_per_gpu'], '9.2f'):>9}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "seq_len": args.seq_len, "device": jax.devices()[0].device_kind,
                               "jax": jax.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
