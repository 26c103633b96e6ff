#!/usr/bin/env python
"""Training throughput: tokens/s, MFU and peak device memory of one training step.

Models drt-133m, swa-133m, full-133m at 4K/16K/32K/64K tokens per sequence, batch 1 (--batch), bf16
compute over fp32 master weights, per-layer remat, blocked cross-entropy, AdamW; synthetic random tokens.
A model is a preset name or a file with MODEL (e.g. experiments/configs/swa-20m.py).
The step is the trainer's own (drt_jax.train.step.make_train_step on a 1-device mesh). Each case:
one compile+warm-up step, then --steps timed steps. An out-of-memory failure is recorded as a miss.

    PYTHONPATH=. python bench/train_throughput.py                      # the full table
    PYTHONPATH=. python bench/train_throughput.py --models drt-133m --lengths 4096 --steps 2
    PYTHONPATH=. python bench/train_throughput.py --models experiments/configs/drt-20m.py \
        experiments/configs/swa-20m.py --lengths 4096 --batch 16 --remat none   # issue 9's trainer shapes

Writes bench/results/train_throughput.json (or --out) after every case and prints a table.
Imports neither grain nor tensorboardX (the GPU image has neither).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


ORDER_DEFAULT = [
    # Most decisive cases first, so a time limit leaves the targets measured.
    ("drt-133m", 16384), ("swa-133m", 16384), ("drt-133m", 65536), ("full-133m", 4096), ("full-133m", 16384),
    ("drt-133m", 4096), ("swa-133m", 4096), ("drt-133m", 32768), ("swa-133m", 32768), ("full-133m", 32768),
    ("swa-133m", 65536), ("full-133m", 65536),
]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run_case(name: str, seq_len: int, steps: int, remat: str, batch: int = 1):
    import jax
    import numpy as np

    from drt_jax.config import ModelConfig
    from drt_jax.train import mesh as mesh_lib
    from drt_jax.train.config import DEFAULT_RULES, MeshConfig, OptimConfig
    from drt_jax.train.metrics import peak_flops_per_device, train_flops_per_sequence
    from drt_jax.train.optim import make_optimizer
    from drt_jax.train.step import init_state, make_train_step, state_spec

    cfg = ModelConfig.from_preset(name).replace(dtype="bfloat16", param_dtype="float32", remat=remat)
    device = jax.devices()[0]
    mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), [device])
    tx, schedule = make_optimizer(OptimConfig(), 1000)
    spec = state_spec(cfg, tx, mesh, DEFAULT_RULES)
    bsh = mesh_lib.batch_sharding(mesh, DEFAULT_RULES)
    step = make_train_step(cfg, tx, schedule, spec, bsh, grad_accum=1, block_size=1024)
    state = init_state(cfg, tx, spec, seed=0)
    rng = np.random.RandomState(seq_len)
    batches = [
        mesh_lib.global_batch(
            {"tokens": rng.randint(0, min(cfg.vocab_size, 50257), (batch, seq_len)).astype(np.int32),
             "mask": np.ones((batch, seq_len), np.int32)}, bsh, batch)
        for _ in range(2)
    ]
    tokens_per_step = int(batches[0]["tokens"].size)
    t0 = time.perf_counter()
    lowered = step.lower(state, batches[0])
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    est = None
    if mem is not None:
        est = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes)
    state, m = compiled(state, batches[0])
    jax.block_until_ready(m)
    loss0 = float(m["loss"])
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = compiled(state, batches[i % 2])
    jax.block_until_ready((state, m))
    dt = (time.perf_counter() - t0) / steps
    flops_seq = train_flops_per_sequence(cfg, seq_len)
    flops = batch * flops_seq
    peak = peak_flops_per_device(device)
    stats = device.memory_stats() or {}
    del state, batches
    return {
        "status": "ok", "step_s": dt, "tokens_per_s": tokens_per_step / dt, "tokens_per_step": tokens_per_step,
        "model_tflops_per_s": flops / dt / 1e12,
        "mfu": (flops / dt / peak) if peak else None, "compile_s": compile_s, "loss": loss0,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "compiled_bytes_estimate": est,
        "train_flops_per_seq": flops_seq,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--lengths", nargs="*", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the compile/warm-up step")
    parser.add_argument("--remat", default="full")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip the remaining cases after this many seconds")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_throughput.json"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import jax

    cases = [(m, t) for m, t in ORDER_DEFAULT if (args.models is None or m in args.models) and (args.lengths is None or t in args.lengths)]
    if args.models and not cases:  # other presets (e.g. tiny for a CPU smoke test)
        cases = [(m, t) for m in args.models for t in (args.lengths or [4096])]
    dev = jax.devices()[0]
    result = {
        "device": f"{dev.platform}:{dev.device_kind}", "jax": jax.__version__, "date": datetime.date.today().isoformat(),
        "commit": commit(), "command": "PYTHONPATH=. python bench/train_throughput.py " + " ".join(argv or sys.argv[1:]),
        "settings": {"batch": args.batch, "dtype": "bfloat16 compute, float32 params", "remat": args.remat, "timed_steps": args.steps,
                     "loss": "blocked cross-entropy (1024-token blocks)", "optimizer": "AdamW + clip"},
        "cases": [],
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for name, seq_len in cases:
        row = {"model": name, "seq_len": seq_len}
        if time.time() - start > args.budget_s:
            row.update(status="skipped (time budget)")
        else:
            t0 = time.time()
            try:
                row.update(run_case(name, seq_len, args.steps, args.remat, args.batch))
            except Exception as err:  # noqa: BLE001 - record and continue
                text = " ".join(str(err).split())
                oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "Out of memory" in text
                row.update(status="miss: OOM" if oom else f"error: {type(err).__name__}", error=text[:400])
            row["wall_s"] = time.time() - t0
            jax.clear_caches()
        result["cases"].append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps(result, indent=2))
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    print(f"\n{result['device']}  jax {result['jax']}  {result['date']}  commit {result['commit']}")
    print(f"{'model':<10} {'seq':>6} {'status':<10} {'tokens/s':>10} {'step s':>8} {'MFU':>6} {'mem GB':>8} {'compile s':>9}")
    for r in sorted(result["cases"], key=lambda r: (r["model"], r["seq_len"])):
        if r.get("status") == "ok":
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            peak = r.get("compiled_bytes_estimate") or r.get("peak_bytes_in_use") or 0
            print(f"{pathlib.Path(r['model']).stem:<10} {r['seq_len']:>6} {'ok':<10} {r['tokens_per_s']:>10.0f} {r['step_s']:>8.3f} {mfu:>6} "
                  f"{peak / 2**30:>8.1f} {r['compile_s']:>9.1f}")
        else:
            print(f"{pathlib.Path(r['model']).stem:<10} {r['seq_len']:>6} {r['status']}")


if __name__ == "__main__":
    sys.exit(main())
