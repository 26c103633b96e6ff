"""Checkpoint robustness: kill -9 during an async save leaves the previous checkpoint restorable, and
SIGTERM saves a checkpoint before the process exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from drt_jax.train.checkpoints import load_for_eval
from tests.train_fixtures import REPO, cli_env, config_file, write_corpus

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
