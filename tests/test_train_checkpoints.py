"""Checkpoint robustness: kill -9 during an async save leaves the previous checkpoint restorable,
repeated kill -9 and resume ends bitwise equal to a straight run, SIGTERM saves before exiting, a
damaged newest checkpoint is moved aside and the previous one resumed (train and eval), all damaged
is a one-line error, and a non-finite step is never saved."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from drt_jax.train import loop as loop_module
from drt_jax.train.checkpoints import CheckpointError, load_for_eval
from drt_jax.train.loop import train
from tests.train_fixtures import (
    REPO,
    STEPS,
    assert_one_line_error,
    cli_env,
    config_file,
    enable_compilation_cache,
    logged_losses,
    run_cli,
    small_run,
    straight_run,
    write_corpus,
)

# Runs train.py with orbax's commit step (the rename of the finished temporary folder) delayed from
# the second save on: the process can then be killed while a save is in flight but not committed.
SLOW_COMMIT = textwrap.dedent(
    """
    import asyncio, sys
    from orbax.checkpoint._src.path import atomicity
    original = atomicity.on_commit_callback
    calls = {"n": 0}

    async def slow_commit(tmp_dir, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            print("COMMIT_PENDING", flush=True)
            await asyncio.sleep(600)
        return await original(tmp_dir, **kwargs)

    atomicity.on_commit_callback = slow_commit
    sys.path.insert(0, sys.argv[1])
    import train
    sys.exit(train.main(sys.argv[2:]))
    """
)


def _read_until(proc: subprocess.Popen, needle: str, timeout: float) -> list[str]:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen; output: {''.join(lines)[-3000:]}; stderr: {proc.stderr.read()[-3000:] if proc.poll() is not None else ''}")


def test_kill_9_during_async_save_leaves_previous_checkpoint(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = config_file(tmp_path, corpus, name="killed")
    script = tmp_path / "slow_commit.py"
    script.write_text(SLOW_COMMIT)
    proc = subprocess.Popen([sys.executable, str(script), str(REPO), "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env({"PYTHONUNBUFFERED": "1"}), cwd=str(REPO))
    try:
        _read_until(proc, "COMMIT_PENDING", timeout=300)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpts = tmp_path / "killed" / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert "10" in names and "20" not in names, names
    assert any(n.startswith("20.") and "tmp" in n for n in names), names  # the save of step 20 was cut off mid-way

    model, params, _ = load_for_eval(tmp_path / "killed")
    assert params["embed"]["embedding"].shape == (259, 32)

    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(cfg)], capture_output=True, text=True,
                          timeout=300, env=cli_env(), cwd=str(REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed" in done.stdout and "from step 10" in done.stdout, done.stdout[-2000:]
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["20", "30"]


KILL_RUN = dict(checkpoint_every=1, keep_checkpoints=2, eval_every=0, log_every=5)


def _newest(ckpts: pathlib.Path) -> int:
    return max((int(p.name) for p in ckpts.iterdir() if p.name.isdigit()), default=0) if ckpts.is_dir() else 0


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Polls until predicate() holds (True) or the process ends first (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("the training process made no progress")


def _kill_and_resume(tmp: pathlib.Path, kills: int, seed: int) -> None:
    """`kills` times: start train.py (resuming), kill -9 it at a seeded random moment, then let a last
    run finish; the parameters must equal an uninterrupted run's bit for bit."""
    corpus = write_corpus(tmp / "corpus")
    cfg = config_file(tmp, corpus, name="killed", **KILL_RUN)
    ckpts = tmp / "killed" / "checkpoints"
    rng = random.Random(seed)
    done = 0
    while done < kills:
        start = _newest(ckpts)
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=str(REPO))
        try:
            moment = rng.choice(["save in flight", "save committed", "resuming"])
            if moment == "save in flight":  # orbax writes step N to "N.orbax-checkpoint-tmp-*" first
                hit = _wait_for(lambda n=start + 1: ckpts.is_dir() and any(p.name.startswith(f"{n}.") for p in ckpts.iterdir()), proc)
            elif moment == "save committed":
                hit = _wait_for(lambda n=start: _newest(ckpts) > n, proc)
            else:  # during start-up, restore or compilation
                time.sleep(rng.uniform(0.5, 6.0))
                hit = proc.poll() is None
            time.sleep(rng.uniform(0, 0.05))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert hit and proc.returncode == -signal.SIGKILL, (moment, proc.returncode, proc.stderr.read()[-3000:])
        assert _newest(ckpts) < STEPS, "the run ended before all kills; kill sooner"
        done += 1
    last = run_cli(["--config", str(cfg)], timeout=300)
    assert last.returncode == 0 and "from step" in last.stdout, last.stderr[-3000:]
    straight = small_run(tmp, corpus, name="straight", **KILL_RUN)
    train(straight, print_fn=lambda *a: None)
    _, killed_params, _ = load_for_eval(tmp / "killed")
    _, straight_params, _ = load_for_eval(straight.run_dir)
    for a, b in zip(jax.tree.leaves(killed_params), jax.tree.leaves(straight_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_repeated_kill_9_and_resume_is_bitwise_a_straight_run(tmp_path):
    enable_compilation_cache()
    _kill_and_resume(tmp_path, kills=10, seed=0)


@pytest.mark.slow
def test_repeated_kill_9_and_resume_many_times(tmp_path):
    enable_compilation_cache()
    _kill_and_resume(tmp_path, kills=25, seed=1)


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = config_file(tmp_path, corpus, name="term", checkpoint_every=1000)
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env({"PYTHONUNBUFFERED": "1"}), cwd=str(REPO))
    try:
        _read_until(proc, "step 1: loss", timeout=300)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "on SIGTERM" in out, out[-2000:]
    steps = [int(p.name) for p in (tmp_path / "term" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 1 <= steps[0] < 30, steps


# --- damaged checkpoints and non-finite states (issue 12) ------------------------------------------


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 8-step run with checkpoints 4, 6, 8 and the loss of every step."""
    return straight_run(tmp_path_factory.mktemp("straight"), **DAMAGE_RUN)


DAMAGE_RUN = dict(checkpoint_every=2, keep_checkpoints=3, log_every=1, eval_every=0)


def _copy_run(tmp: pathlib.Path, run, name: str):
    """A copy of `run`'s folder under a new name, and the RunConfig that trains it."""
    shutil.copytree(run.run_dir, tmp / name)
    return run.replace(train=dataclasses.replace(run.train, run_dir=str(tmp / name)))


def _damage(step_dir: pathlib.Path, how: str) -> None:
    if how == "truncated arrays":  # as a partial copy or a full disk leaves them
        files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
        assert files
        for p in files:
            with open(p, "r+b") as f:
                f.truncate(64)
    elif how == "missing optimizer file":
        files = [p for p in (step_dir / "opt_state").rglob("*") if p.is_file() and p.parent.name == "d"]
        assert files
        for p in files:
            p.unlink()
    elif how == "missing data iterator":
        (step_dir / "data" / "process_0-of-1.json").unlink()
    elif how == "garbage metadata":
        (step_dir / "meta" / "_METADATA").write_bytes(b"\x00garbage{" * 10)
    elif how == "garbage model config":
        (step_dir / "model" / "metadata").write_text("{not json")
    else:
        raise AssertionError(how)


DAMAGES = ["truncated arrays", "missing optimizer file", "missing data iterator", "garbage metadata", "garbage model config"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(straight, how):
    tmp, _, run, losses = straight
    copy = _copy_run(tmp, run, "broken-" + how.replace(" ", "-"))
    ckpts = copy.run_dir / "checkpoints"
    _damage(ckpts / "8", how)
    printed = []
    summary = train(copy, stop_at=8, print_fn=printed.append)
    assert summary.start_step == 6, printed
    notes = [line for line in printed if "damaged" in line]
    assert len(notes) == 1 and "checkpoint 8" in notes[0] and "\n" not in notes[0], printed
    assert (ckpts / "damaged-8").is_dir()  # moved aside, never deleted
    # Steps 7 and 8 again, exactly as the uninterrupted run computed them.
    redone = logged_losses(copy.run_dir)[len(losses):]
    assert redone == [(s, v) for s, v in losses if s > 6], (redone, losses)
    # The moved folder is not taken for a step: the next resume starts from the new checkpoint 8.
    summary = train(copy, stop_at=9, print_fn=lambda *a: None)
    assert summary.start_step == 8 and (ckpts / "damaged-8").is_dir()
    assert load_for_eval(copy.run_dir)[1]["embed"]["embedding"].shape == (259, 32)


def test_eval_moves_a_damaged_checkpoint_aside_and_names_a_damaged_step(straight):
    tmp, _, run, _ = straight
    copy = _copy_run(tmp, run, "eval-broken")
    _damage(copy.run_dir / "checkpoints" / "8", "truncated arrays")
    with pytest.raises(CheckpointError, match="step 8") as err:
        load_for_eval(copy.run_dir, step=8)  # a named damaged step: an error, nothing moved
    assert "\n" not in str(err.value) and (copy.run_dir / "checkpoints" / "8").is_dir()
    _, params, _ = load_for_eval(copy.run_dir)  # the same rule as training: moved aside, the previous one read
    assert (copy.run_dir / "checkpoints" / "damaged-8").is_dir() and not (copy.run_dir / "checkpoints" / "8").exists()
    _, params6, _ = load_for_eval(run.run_dir, step=6)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params6), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_all_checkpoints_damaged_is_a_one_line_error(straight):
    tmp, corpus, run, _ = straight
    copy = _copy_run(tmp, run, "all-broken")
    ckpts = copy.run_dir / "checkpoints"
    for step in (4, 6, 8):
        _damage(ckpts / str(step), "truncated arrays")
    cfg = config_file(tmp, corpus, name="all-broken", **DAMAGE_RUN)
    proc = run_cli(["--config", str(cfg)])
    assert_one_line_error(proc, str(ckpts), "train.resume_step")
    assert sorted(p.name for p in ckpts.iterdir()) == ["4", "6", "8"]  # nothing moved: no good one to go back to
    ev = subprocess.run([sys.executable, str(REPO / "eval.py"), "generate", "--checkpoint", str(copy.run_dir), "--prompt", "a"],
                        capture_output=True, text=True, timeout=240, env=cli_env(), cwd=str(REPO))
    assert ev.returncode == 2 and "Traceback" not in ev.stderr, ev.stderr[-3000:]
    assert len([line for line in ev.stderr.splitlines() if "error" in line]) == 1, ev.stderr[-3000:]


def test_resume_step_picks_an_older_checkpoint(straight):
    tmp, _, run, losses = straight
    copy = _copy_run(tmp, run, "resume-step")
    pinned = copy.replace(train=dataclasses.replace(copy.train, resume_step=4))
    summary = train(pinned, stop_at=6, print_fn=lambda *a: None)
    assert (summary.start_step, summary.end_step) == (4, 6)
    assert logged_losses(copy.run_dir)[len(losses):] == [(s, v) for s, v in losses if 4 < s <= 6]
    names = sorted(p.name for p in (copy.run_dir / "checkpoints").iterdir())
    assert "unused-8" in names and "8" not in names, names


def test_resume_step_0_starts_over_and_moves_every_checkpoint_aside(straight):
    """The README's way out when no checkpoint reads: train.resume_step=0 trains from step 0 in the same
    folder, with the old checkpoints under checkpoints/unused-<step>/ (kept, not read)."""
    tmp, _, run, losses = straight
    copy = _copy_run(tmp, run, "start-over")
    ckpts = copy.run_dir / "checkpoints"
    for step in (4, 6, 8):
        _damage(ckpts / str(step), "truncated arrays")
    printed = []
    summary = train(copy.replace(train=dataclasses.replace(copy.train, resume_step=0)), stop_at=2, print_fn=printed.append)
    assert (summary.start_step, summary.end_step) == (0, 2)
    assert logged_losses(copy.run_dir)[len(losses):] == [(s, v) for s, v in losses if s <= 2]
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "unused-4", "unused-6", "unused-8"]
    assert (ckpts / "unused-8" / "params").is_dir()
    assert sum("unused-" in line for line in printed) == 3, printed


def test_non_finite_step_stops_without_saving_it(straight, monkeypatch):
    """A NaN at step 7 (not a logging step, every step saved) stops the run naming step 7; the
    newest checkpoint is step 6 and holds finite parameters."""
    tmp, corpus, _, _ = straight
    run = small_run(tmp, corpus, name="nan", checkpoint_every=1, keep_checkpoints=3, log_every=5, eval_every=0)
    real = loop_module.make_train_step

    def poisoned(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def step(state, batch):
            state, metrics = step_fn(state, batch)
            if int(state["step"]) == 7:
                state = {**state, "params": jax.tree.map(lambda x: x * np.float32("nan"), state["params"])}
                metrics = {**metrics, "loss": metrics["loss"] * np.float32("nan")}
            return state, metrics

        return step

    monkeypatch.setattr(loop_module, "make_train_step", poisoned)
    with pytest.raises(FloatingPointError, match="step 7") as err:
        train(run, stop_at=12, print_fn=lambda *a: None)
    assert "\n" not in str(err.value)
    steps = sorted(int(p.name) for p in (run.run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 6, steps
    _, params, _ = load_for_eval(run.run_dir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_a_checkpoint_older_than_a_model_field_reads_as_that_fields_default():
    """Checkpoints and bundles written before a ModelConfig field existed keep loading: the run had the
    field's default behaviour. Setting the field to anything else is still a mismatch."""
    import dataclasses

    from drt_jax.config import ModelConfig
    from drt_jax.train.config import model_mismatch

    cfg = ModelConfig.from_preset("tiny")
    saved = dataclasses.asdict(cfg)
    del saved["gumbel_scale"]
    assert model_mismatch(saved, cfg) is None
    assert "model.gumbel_scale" in model_mismatch(saved, cfg.replace(gumbel_scale=0.5))
    assert "model.top_k" in model_mismatch(dataclasses.asdict(cfg), cfg.replace(top_k=cfg.top_k + 1))
