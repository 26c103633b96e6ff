"""One segment of a run as a time-limited job that keeps no local disk: import -> train -> export -> evaluate.

A segment is one job of a run that is longer than a job may last: a spot or preemptible instance, or a
cluster queue's wall-time limit. Nothing on the machine outlives the job, so the run travels between
segments as a bundle (drt_jax/train/bundle.py) in --out, an ordinary output folder that the job copies
back (to shared storage or a bucket) when it ends; the next segment starts from it with --bundle-in.

    python experiments/segment.py --config experiments/configs/drt-20m.py --out out/seg1 \
        [--bundle-in DIR | --init-bundle DIR] [--budget-s 560] [--eval-s 150] [--set train.steps=3000 ...] \
        [--stage "150:data.seq_len=512 train.batch=128" ...] \
        [--niah 4K,16K,64K --depths 0,0.5,1 --samples 4] [--ppl 2K,8K [--ppl-windows 32]] [--probe 512]

1. With --bundle-in, the previous segment's bundle is imported into runs/<name> (the run then resumes
   from its step; without optimizer state in the bundle the optimizer restarts, and says so). Where
   runs/<name> is still there at or past the bundle's step (the next job landed on the same machine,
   or the runs folder is on shared storage), the run resumes from there (optimizer state included)
   and the bundle is not imported.
2. train.py runs with train.time_limit_s set so that training, the export and the evaluation all end
   within --budget-s of this script's start (set it a little below the job's wall-time limit).
   With --stage (a curriculum), each "SECONDS:OVERRIDES" stage first trains for SECONDS as its own run
   (runs/<name>-stage<i>, the overrides added to --set), starting from the previous stage (the first
   from --init-bundle, if given); the main run then starts from the last stage.
3. The newest checkpoint is exported as a bundle to OUT/bundle (at most 6 files of 16 MiB, so that the
   bundle and the logs fit in 8 files), before evaluating, so a slow evaluation never loses the training.
4. eval.py niah (in the run's NIAH layout, data.niah_align) / ppl and experiments/gca_probe.py (--probe)
   run on the checkpoint; their JSON and PNGs,
   metrics.jsonl (the stages' too), the TensorBoard events, config.json and this segment's log go to
   OUT/logs.tar.gz.
Every command is printed and its wall time recorded in OUT/logs.tar.gz:segment.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import subprocess
import sys
import tarfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _say(log, text: str) -> None:
    print(text, flush=True)
    log.write(text + "\n")


def _run(cmd: list[str], log, timings: list, timeout: float | None = None) -> int:
    """Runs cmd, echoing its output to stdout and the log; kills it after `timeout` seconds (rc -9),
    also while it is still printing or silent, so that the segment ends in time and its logs come back."""
    _say(log, "+ " + " ".join(cmd))
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def echo():
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = -9
        _say(log, f"killed after {timeout:.0f} s (the segment's time budget)")
    reader.join(timeout=5)
    timings.append({"command": " ".join(cmd), "seconds": round(time.time() - t0, 1), "rc": rc})
    log.flush()
    return rc


def kept_step(run_dir: pathlib.Path, bundle) -> int | None:
    """The newest checkpoint step of run_dir if it is at least the bundle's step (the run folder survived
    since the bundle was written, e.g. the job ran on the same machine again: resume there, do not
    import), else None."""
    from drt_jax.train.checkpoints import read_only_checkpointer

    manifest = pathlib.Path(bundle) / "manifest.json"
    if not (run_dir / "checkpoints").is_dir() or not manifest.is_file():
        return None
    try:
        want = int(json.loads(manifest.read_text())["step"])
    except (ValueError, KeyError, TypeError):
        return None  # the import names what is wrong with the bundle
    steps = read_only_checkpointer(run_dir).all_steps()
    return max(steps) if steps and max(steps) >= want else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="output folder for the bundle and logs.tar.gz (copy it to lasting storage when the job ends)")
    p.add_argument("--bundle-in", default=None, help="bundle of the previous segment to resume from")
    p.add_argument("--init-bundle", default=None,
                   help="bundle of another run (e.g. pretraining) whose parameters start this one (train.init_from)")
    p.add_argument("--budget-s", type=float, default=560.0, help="the whole segment ends within this many seconds")
    p.add_argument("--eval-s", type=float, default=150.0, help="seconds kept for the export and the evaluation")
    p.add_argument("--set", nargs="*", default=[], dest="overrides")
    p.add_argument("--niah", default="", help="NIAH lengths, e.g. 4K,16K,64K (empty: none)")
    p.add_argument("--niah-task", default="single", choices=["single", "multi", "2hop"])
    p.add_argument("--depths", default="0,0.5,1")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--niah-offload", default="none", choices=["none", "host"])
    p.add_argument("--niah-top-k", default="", metavar="K,K",
                   help="evaluate NIAH once per retrieval count (eval.py --top-k), e.g. 8,2 (empty: the model's)")
    p.add_argument("--ppl", default="", help="held-out perplexity lengths, e.g. 2K,8K (empty: none)")
    p.add_argument("--ppl-windows", type=int, default=32,
                   help="windows per perplexity length (eval.py ppl --max-windows; 32 is docs/results.md's protocol)")
    p.add_argument("--stage", action="append", default=[], dest="stages", metavar="SECONDS:OVERRIDES",
                   help='a curriculum stage before the main run, e.g. "150:data.seq_len=512 train.batch=128" (repeatable)')
    p.add_argument("--probe", type=int, default=0, metavar="LENGTH",
                   help="run experiments/gca_probe.py on the checkpoint at this NIAH length (0: no probe)")
    args = p.parse_args(argv)
    stages = []
    for item in args.stages:
        secs, _, rest = item.partition(":")
        try:
            stages.append((float(secs), shlex.split(rest)))
        except ValueError:
            p.error(f"--stage {item!r}: write SECONDS:OVERRIDES, e.g. \"150:data.seq_len=512 train.batch=128\"")
    top_ks = [0]  # 0: the model's own top_k
    if args.niah_top_k:
        top_ks = [int(k) for k in args.niah_top_k.split(",") if k.isdigit() and int(k) > 0]
        if len(top_ks) != len(args.niah_top_k.split(",")):
            p.error(f"--niah-top-k {args.niah_top_k!r}: write retrieval counts >= 1, e.g. 8,2")
    if stages and args.bundle_in:
        p.error("--stage starts new runs from --init-bundle; it cannot resume a --bundle-in run")

    start = time.time()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from drt_jax.config import ConfigError
    from drt_jax.train.config import load_run_config

    try:
        run = load_run_config(args.config, args.overrides)
        # Every stage's settings are checked before anything trains.
        stage_runs = [load_run_config(args.config, [*args.overrides, *overrides, f"name={run.name}-stage{i}"])
                      for i, (_, overrides) in enumerate(stages)]
    except ConfigError as err:
        p.error(str(err))
    run_dir = run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    eval_dir = run_dir / "eval"
    timings: list = []
    stage_dirs: list[pathlib.Path] = []
    py = sys.executable
    with open(run_dir / "segment.log", "a") as log:
        kept = kept_step(run_dir, args.bundle_in) if args.bundle_in else None
        if kept is not None:
            _say(log, f"{run_dir} already holds step {kept}, at or past the bundle's step (the run folder outlived the last job): "
                      "resuming from it, not importing the bundle")
        elif args.bundle_in:
            if _run([py, "-m", "drt_jax.train.bundle", "import", "--bundle", args.bundle_in, "--run-dir", str(run_dir)], log, timings):
                return 2
        init = []
        if args.init_bundle:
            init_dir = run_dir.parent / f"{run.name}-init"
            if _run([py, "-m", "drt_jax.train.bundle", "import", "--bundle", args.init_bundle, "--run-dir", str(init_dir)], log, timings):
                return 2
            init = [f"train.init_from={init_dir}"]
        rc = 0
        for (seconds, overrides), stage_run in zip(stages, stage_runs, strict=True):
            stage_dirs.append(stage_run.run_dir)
            rc = _run([py, "train.py", "--config", args.config, "--set", *args.overrides, *overrides,
                       f"name={stage_run.name}", *init, f"train.time_limit_s={seconds:.0f}"], log, timings)
            if rc:
                break
            init = [f"train.init_from={stage_run.run_dir}"]
        if rc == 0:
            limit = max(30.0, args.budget_s - args.eval_s - (time.time() - start))
            rc = _run([py, "train.py", "--config", args.config, "--set", *args.overrides, *init,
                       f"train.time_limit_s={limit:.0f}"], log, timings)
        if rc == 0:
            _run([py, "-m", "drt_jax.train.bundle", "export", "--run-dir", str(run_dir), "--out", str(out / "bundle"),
                  "--max-files", "6"], log, timings)
            left = lambda: args.budget_s - (time.time() - start) - 10
            for k in top_ks:
                if not args.niah or left() <= 20:
                    break
                pick = ["--top-k", str(k)] if k else []
                _run([py, "eval.py", "niah", "--checkpoint", str(run_dir), "--task", args.niah_task, "--lengths", args.niah,
                      "--depths", args.depths, "--samples", str(args.samples), "--offload", args.niah_offload,
                      "--data", run.data.corpus, "--split", "val", "--align", run.data.niah_align, *pick, "--no-progress",
                      "--out", str(eval_dir / f"niah_{args.niah_task}{f'_k{k}' if k else ''}.json")],
                     log, timings, timeout=left())
            if args.ppl and left() > 20:
                _run([py, "eval.py", "ppl", "--checkpoint", str(run_dir), "--data", run.data.corpus, "--split", "val",
                      "--lengths", args.ppl, "--max-windows", str(args.ppl_windows),
                      "--no-progress", "--out", str(eval_dir / "ppl.json")], log, timings, timeout=left())
            if args.probe and left() > 20:
                _run([py, str(ROOT / "experiments" / "gca_probe.py"), "--checkpoint", str(run_dir),
                      "--length", str(args.probe), "--lm-windows", "4",
                      "--out", str(eval_dir / "gca_probe.json")], log, timings, timeout=left())
    (run_dir / "segment.json").write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                                     "bundle_in": args.bundle_in, "steps": timings,
                                                     "wall_s": round(time.time() - start, 1)}, indent=2))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for path in sorted(run_dir.iterdir()):
            if path.name != "checkpoints":
                tar.add(path, arcname=f"{run.name}/{path.name}")
        for stage_dir in stage_dirs:
            for name in ("metrics.jsonl", "config.json"):
                if (stage_dir / name).is_file():
                    tar.add(stage_dir / name, arcname=f"{run.name}/stages/{stage_dir.name}/{name}")
    print(f"segment done in {time.time() - start:.0f} s; bundle and logs in {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
