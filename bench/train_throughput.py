#!/usr/bin/env python
"""Training throughput: tokens/s, MFU and peak device memory of one training step.

Models drt-133m, swa-133m, full-133m at 4K/16K/32K/64K tokens per sequence, batch 1 (--batch), bf16
compute over fp32 master weights, blocked cross-entropy, AdamW; synthetic random tokens. --remat (default
auto, as train.py resolves it: the least recomputation whose step fits the free memory; each row records
the policy it ran).
A model is a preset name or a file with MODEL (e.g. experiments/configs/swa-20m.py).
The step is the trainer's own (drt_jax.train.step.make_train_step on a 1-device mesh). Each case:
one compile+warm-up step, then --steps timed steps. An out-of-memory failure is recorded as a miss.

    PYTHONPATH=. python bench/train_throughput.py                      # the full table
    PYTHONPATH=. python bench/train_throughput.py --models drt-133m --lengths 4096 --steps 2
    PYTHONPATH=. python bench/train_throughput.py --models experiments/configs/drt-20m.py \
        experiments/configs/swa-20m.py --lengths 4096 --batch 16 --remat none   # issue 9's trainer shapes

Loop mode (--run CONFIG [--set ...]): the trainer's loop against its own step. For one run config (with
its data, task mixture and grain settings) it times (1) the step alone, jitted exactly as train.py
does, on two real batches of the run already on the device, and (2) train.py's loop (drt_jax.train.loop
.train) for --loop-steps steps after --warmup steps, read from the run's metrics.jsonl, and prints both
and their ratio:

    PYTHONPATH=. python bench/train_throughput.py --run experiments/configs/drt-20m-niah.py \
        --set data.num_workers=8 model.gca_residual=standard model.gumbel_scale=0.5 --loop-steps 200

Writes bench/results/train_throughput.json (or --out) after every case and prints a table.
The step-only mode imports neither grain nor tensorboardX.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


ORDER_DEFAULT = [
    # Most decisive cases first, so a time limit leaves the targets measured.
    ("drt-133m", 16384), ("swa-133m", 16384), ("drt-133m", 65536), ("full-133m", 4096), ("full-133m", 16384),
    ("drt-133m", 4096), ("swa-133m", 4096), ("drt-133m", 32768), ("swa-133m", 32768), ("full-133m", 32768),
    ("swa-133m", 65536), ("full-133m", 65536),
]


def header(argv) -> dict:
    """What every result file records first: the device, jax, date, commit and the command."""
    import jax

    from drt_jax.train.loop import git_commit

    dev = jax.devices()[0]
    return {"device": f"{dev.platform}:{dev.device_kind}", "jax": jax.__version__, "date": datetime.date.today().isoformat(),
            "commit": git_commit(), "command": "PYTHONPATH=. python bench/train_throughput.py " + " ".join(argv or sys.argv[1:])}


def run_case(name: str, seq_len: int, steps: int, remat: str, batch: int = 1, profile: bool = False,
             hlo_dir: str | None = None, logits_dtype: str = "float32", profile_top: int = 25,
             model_overrides: dict | None = None):
    import jax
    import numpy as np

    from drt_jax.config import ModelConfig
    from drt_jax.train import mesh as mesh_lib
    from drt_jax.train.config import DEFAULT_RULES, MeshConfig, OptimConfig, TrainConfig
    from drt_jax.train.metrics import peak_flops_per_device, train_flops_per_sequence
    from drt_jax.train.optim import make_optimizer
    from drt_jax.train.step import init_state, make_train_step, resolve_remat, state_spec

    cfg = ModelConfig.from_preset(name).replace(dtype="bfloat16", param_dtype="float32", remat=remat, **(model_overrides or {}))
    device = jax.devices()[0]
    mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), [device])
    tx, schedule = make_optimizer(OptimConfig(), 1000)
    spec = state_spec(cfg, tx, mesh, DEFAULT_RULES)
    bsh = mesh_lib.batch_sharding(mesh, DEFAULT_RULES)
    block = TrainConfig().loss_block_size
    build = lambda c: make_train_step(c, tx, schedule, spec, bsh, grad_accum=1, block_size=block,  # noqa: E731
                                         logits_dtype=logits_dtype)
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
    # "auto" resolves as train.py does: the first of none/dots/full whose step fits the free memory.
    batch_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in batches[0].items()}
    cfg, step = resolve_remat(cfg, build, (spec.abstract, batch_abs), say=lambda *_: None)
    compiled = step.lower(state, batches[0]).compile() if hasattr(step, "lower") else step
    compile_s = time.perf_counter() - t0
    if hlo_dir:
        # The optimized HLO names every fusion a trace lists, with the ops inside it.
        import gzip

        pathlib.Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        with gzip.open(pathlib.Path(hlo_dir) / f"{pathlib.Path(name).stem}-{seq_len}-{cfg.remat}.hlo.txt.gz", "wt") as f:
            f.write(compiled.as_text())
    mem = compiled.memory_analysis()
    est = None
    if mem is not None:
        est = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes)
    state, m = compiled(state, batches[0])
    jax.block_until_ready(m)
    loss0 = float(m["loss"])
    trace_dir = None
    if profile:
        import tempfile

        trace_dir = tempfile.mkdtemp(prefix="drt-bench-step-")
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    t0 = time.perf_counter()
    for i in range(steps):
        with jax.profiler.StepTraceAnnotation("train", step_num=i):
            state, m = compiled(state, batches[i % 2])
    jax.block_until_ready((state, m))
    dt = (time.perf_counter() - t0) / steps
    summary = None
    if trace_dir:
        import shutil

        from drt_jax.train.profiling import attribute, summarize

        jax.profiler.stop_trace()
        summary = attribute(summarize(trace_dir, top=profile_top, traced_steps=steps), compiled.as_text())
        shutil.rmtree(trace_dir, ignore_errors=True)
    flops_seq = train_flops_per_sequence(cfg, seq_len)
    flops = batch * flops_seq
    peak = peak_flops_per_device(device)
    stats = device.memory_stats() or {}
    del state, batches
    return {
        "status": "ok", "remat": cfg.remat, "step_s": dt, "tokens_per_s": tokens_per_step / dt, "tokens_per_step": tokens_per_step,
        "model_tflops_per_s": flops / dt / 1e12,
        "mfu": (flops / dt / peak) if peak else None, "compile_s": compile_s, "loss": loss0,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "compiled_bytes_estimate": est,
        "train_flops_per_seq": flops_seq, **({"profile": summary} if summary else {}),
    }


def _loop_overrides(run_dir: str, steps: int, log_every: int) -> list[str]:
    return [f"train.run_dir={run_dir}", f"train.steps={steps}", f"train.log_every={log_every}", "train.eval_every=0",
            "train.eval_steps=1", f"train.checkpoint_every={steps}", "train.progress_bar=false", "train.time_limit_s=0",
            "train.stop_at_step=none"]


def run_loop_case(config: str, overrides: list[str], warmup: int, loop_steps: int, step_repeats: int, profile: int = 0):
    """Step alone vs the trainer's loop, on the run config `config` with `overrides`."""
    import shutil
    import tempfile

    import jax

    from drt_jax.train.config import load_run_config
    from drt_jax.train.loop import _batch_fields, setup, train
    from drt_jax.train.metrics import peak_flops_per_device, train_flops_per_sequence

    # (1) the step alone: the trainer's own setup (model, data, jitted step) on a fresh run folder, timed
    # on two real batches of the run already on the device
    step_dir = tempfile.mkdtemp(prefix="drt-bench-step-")
    t = setup(load_run_config(config, overrides + [f"train.run_dir={step_dir}"]), print_fn=lambda *a: None)
    run, tc = t.run, t.run.train
    tokens_per_step = t.tokens_per_step
    flops = train_flops_per_sequence(run.model, run.data.seq_len) * tc.batch
    peak = peak_flops_per_device()
    peak_total = peak * jax.device_count() if peak else None
    row = {"run": config, "overrides": overrides, "seq_len": run.data.seq_len, "batch": tc.batch,
           "tokens_per_step": tokens_per_step, "train_flops_per_step": flops}
    batches = [t.to_device(_batch_fields(next(t.train_iter), t.train_keys)) for _ in range(2)]
    state, step = t.state, t.step_fn
    for i in range(3):
        state, m = step(state, batches[i % 2])
    jax.block_until_ready((state, m))
    t0 = time.perf_counter()
    for i in range(step_repeats):
        state, m = step(state, batches[i % 2])
    jax.block_until_ready((state, m))
    step_s = (time.perf_counter() - t0) / step_repeats
    row.update(step_s=step_s, step_tokens_per_s=tokens_per_step / step_s,
               step_mfu=flops / step_s / peak_total if peak_total else None)
    t.ckpt.close()
    shutil.rmtree(step_dir, ignore_errors=True)
    del state, m, batches, step, t
    jax.clear_caches()

    # (2) the loop, timed between its metric rows once compiled and warm
    run_dir = tempfile.mkdtemp(prefix="drt-bench-loop-")
    log_every = max(1, min(25, loop_steps // 4))
    total = warmup + loop_steps
    extra = _loop_overrides(run_dir, total, log_every)
    if profile:
        extra += [f"train.profile_start={warmup}", f"train.profile_steps={profile}"]
    loop_run = load_run_config(config, overrides + extra)
    try:
        t0 = time.perf_counter()
        train(loop_run, print_fn=lambda *a: None)
        row["loop_wall_s"] = time.perf_counter() - t0
        rows = [json.loads(line) for line in open(pathlib.Path(run_dir) / "metrics.jsonl")]
        rows = [r for r in rows if "train/loss" in r and r["step"] >= warmup]
        first, last = rows[0], rows[-1]
        if profile:
            from drt_jax.train.profiling import summarize

            row["profile"] = summarize(pathlib.Path(run_dir) / "profile")
            # Profiled steps are slower; time only the steps after the trace.
            after = [r for r in rows if r["step"] >= warmup + profile + log_every]
            if len(after) >= 2:
                first, last = after[0], after[-1]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    loop_dt = (last["time"] - first["time"]) / (last["step"] - first["step"])
    row.update(loop_steps_timed=last["step"] - first["step"], loop_step_s=loop_dt, loop_tokens_per_s=tokens_per_step / loop_dt,
               loop_mfu=flops / loop_dt / peak_total if peak_total else None, ratio=step_s / loop_dt, status="ok")
    return row


def main(argv=None) -> int:
    from drt_jax.losses import LOGITS_DTYPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--lengths", nargs="*", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the compile/warm-up step")
    parser.add_argument("--remat", default="auto", choices=("auto", "none", "dots", "full"),
                        help="auto (the presets' default): the least recomputation whose step fits, as train.py picks it")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip the remaining cases after this many seconds")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_throughput.json"))
    parser.add_argument("--loss-logits-dtype", default="float32", choices=LOGITS_DTYPES,
                        help="step mode: the dtype the loss head stores its logits in (train.loss_logits_dtype)")
    parser.add_argument("--hlo-dir", default=None, help="step mode: write each case's optimized HLO (gzipped text) here")
    parser.add_argument("--run", help="loop mode: a run config (configs/<name> or a .py path)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="loop mode: overrides of the run config")
    parser.add_argument("--warmup", type=int, default=30, help="loop mode: loop steps before timing (compile, warm-up)")
    parser.add_argument("--loop-steps", type=int, default=200, help="loop mode: timed loop steps")
    parser.add_argument("--step-repeats", type=int, default=20, help="loop mode: timed steps of the step alone")
    parser.add_argument("--profile", type=int, default=0, help="trace this many loop steps (loop mode) or the timed steps (any value > 0, step mode) and summarize them")
    parser.add_argument("--profile-top", type=int, default=25, help="step mode: how many of the busiest kernels the summary lists")
    parser.add_argument("--model-set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="step mode: string fields of the models' configs, e.g. mlp_impl=reference lse_impl=reference")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import jax

    if args.run:
        return loop_main(args, argv)

    if any("=" not in kv for kv in args.model_set):
        parser.error(f"--model-set takes FIELD=VALUE pairs, got {' '.join(args.model_set)}")
    model_sets = dict(kv.split("=", 1) for kv in args.model_set)
    from drt_jax.config import ConfigError
    from drt_jax.train.config import RunConfig, apply_overrides

    try:  # typed as train.py's --set model.FIELD=VALUE is (fuse_qkv=false is a bool, not a string)
        typed = apply_overrides(RunConfig(), [f"model.{k}={v}" for k, v in model_sets.items()]).model
    except ConfigError as err:
        parser.error(f"--model-set: {err}")
    model_overrides = {k: getattr(typed, k) for k in model_sets}
    cases = [(m, t) for m, t in ORDER_DEFAULT if (args.models is None or m in args.models) and (args.lengths is None or t in args.lengths)]
    if args.models and not cases:  # other presets (e.g. tiny for a CPU smoke test)
        cases = [(m, t) for m in args.models for t in (args.lengths or [4096])]
    result = {
        **header(argv),
        "settings": {"batch": args.batch, "dtype": "bfloat16 compute, float32 params", "remat": args.remat, "timed_steps": args.steps,
                     "loss": "blocked cross-entropy (the trainer's block size: 0 = auto, losses.auto_block_size)",
                     "loss_logits_dtype": args.loss_logits_dtype, "model_set": model_sets, "optimizer": "AdamW + clip"},
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
                row.update(run_case(name, seq_len, args.steps, args.remat, args.batch, profile=args.profile > 0,
                                    hlo_dir=args.hlo_dir, logits_dtype=args.loss_logits_dtype,
                                    profile_top=args.profile_top, model_overrides=model_overrides))
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


def loop_main(args, argv) -> int:
    from drt_jax.config import ConfigError
    from drt_jax.data.config import DataError

    result = {**header(argv), "mode": "loop", "cases": []}
    try:
        row = run_loop_case(args.run, list(args.set), args.warmup, args.loop_steps, args.step_repeats, args.profile)
    except (ConfigError, DataError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    result["cases"].append(row)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
    if "profile" in row:
        print(json.dumps(row["profile"], indent=1), flush=True)
    print(f"\n{result['device']}  jax {result['jax']}  {result['date']}  commit {result['commit']}")
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(f"{'run':<22} {'shape':>10} {'step tok/s':>11} {'step MFU':>8} {'loop tok/s':>11} {'loop MFU':>8} {'loop/step':>9}")
    print(f"{pathlib.Path(args.run).stem:<22} {row['seq_len']:>5}x{row['batch']:<4} {row['step_tokens_per_s']:>11,.0f} "
          f"{pct(row['step_mfu']):>8} {row['loop_tokens_per_s']:>11,.0f} {pct(row['loop_mfu']):>8} {row['ratio']:>9.2f}")
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
