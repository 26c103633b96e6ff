"""Shared helpers of the trainer tests (no tests here): a small corpus and a small model."""

from __future__ import annotations

import os
import pathlib
import random
import subprocess
import sys
import tempfile

from drt_jax.config import ModelConfig
from drt_jax.data.config import DataConfig
from drt_jax.train.config import OptimConfig, RunConfig, TrainConfig

REPO = pathlib.Path(__file__).resolve().parents[1]

SMALL_MODEL = dict(
    name="t", d_model=32, n_heads=4, n_kv_heads=2, mlp_dim=64, decoder_layers=(1, 1), encoder_layers=1,
    chunk_size=7, window=16, top_k=2, dropout_rate=0.1,
)

# The tests share one train-step program (same model, schedule and shapes), so XLA compiles it once
# and the persistent compilation cache serves the other runs (in-process and subprocesses alike).
STEPS = 30
CACHE_DIR = os.path.join(tempfile.gettempdir(), "drt_jax_train_test_jax_cache")
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": CACHE_DIR, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


def enable_compilation_cache():
    import jax

    jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

WORDS = "the model reads a chunk and retrieves past chunks to predict the next token with grouped attention".split()


def write_corpus(directory: pathlib.Path, n_docs: int = 24, words_per_doc: int = 400, seed: int = 0,
                 extra: dict[str, bytes] | None = None) -> pathlib.Path:
    """Files of simple, learnable text (a few words in a fixed order with random skips)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for d in range(n_docs):
        out, i = [], rng.randrange(len(WORDS))
        for _ in range(words_per_doc):
            out.append(WORDS[i % len(WORDS)])
            i += 1 if rng.random() < 0.9 else 2
        (directory / f"doc{d:03d}.txt").write_text(" ".join(out) + "\n")
    for name, data in (extra or {}).items():
        (directory / name).write_bytes(data)
    return directory


def small_run(tmp: pathlib.Path, corpus: pathlib.Path, *, steps: int = STEPS, name: str = "t", **train_kw) -> RunConfig:
    train = dict(steps=steps, batch=4, grad_accum=2, eval_every=10, eval_steps=2, checkpoint_every=10, keep_checkpoints=2, log_every=5,
                 run_dir=str(tmp / name), progress_bar=False)
    train.update(train_kw)
    return RunConfig(
        name=name,
        model=ModelConfig(**SMALL_MODEL),
        data=DataConfig(corpus=str(corpus), cache_dir=str(tmp / "cache"), seq_len=64, val_fraction=0.2),
        optim=OptimConfig(peak_lr=3e-3, end_lr=1e-3, warmup_steps=2, weight_decay=0.0),
        train=TrainConfig(**train),
    )


def config_file(tmp: pathlib.Path, corpus: pathlib.Path, *, steps: int = STEPS, name: str = "t", **train_kw) -> pathlib.Path:
    """A configs/*.py-style file defining RUN for the CLI (the same run as `small_run`)."""
    train = dict(steps=steps, batch=4, grad_accum=2, eval_every=10, eval_steps=2, checkpoint_every=10, keep_checkpoints=2, log_every=5,
                 run_dir=str(tmp / name), progress_bar=False)
    train.update(train_kw)
    path = tmp / f"{name}_config.py"
    path.write_text(
        "from drt_jax.config import ModelConfig\n"
        "from drt_jax.data.config import DataConfig\n"
        "from drt_jax.train.config import OptimConfig, RunConfig, TrainConfig\n"
        f"MODEL = ModelConfig(**{SMALL_MODEL!r})\n"
        f"RUN = RunConfig(name={name!r}, model=MODEL, data=DataConfig(corpus={str(corpus)!r}, cache_dir={str(tmp / 'cache')!r}, "
        f"seq_len=64, val_fraction=0.2), optim=OptimConfig(peak_lr=3e-3, end_lr=1e-3, warmup_steps=2, weight_decay=0.0), "
        f"train=TrainConfig(**{train!r}))\n"
    )
    return path


def run_cli(args: list[str], *, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(env), cwd=str(REPO))


def cli_env(extra: dict | None = None) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **CACHE_ENV, **(extra or {})}


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def logged_losses(run_dir: pathlib.Path) -> list[tuple[int, float]]:
    """(step, train loss) of every logged step of a run, from its metrics.jsonl."""
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def straight_run(tmp: pathlib.Path, **train_kw):
    """An uninterrupted run stopped at step 8 (of the shared 30-step schedule) in `tmp`
    -> (tmp, corpus, run, logged losses): the reference the resume tests compare against."""
    from drt_jax.train.loop import train

    enable_compilation_cache()
    corpus = write_corpus(tmp / "corpus")
    run = small_run(tmp, corpus, name="straight", **train_kw)
    train(run, stop_at=8, print_fn=lambda *a: None)
    return tmp, corpus, run, logged_losses(run.run_dir)
