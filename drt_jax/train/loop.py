"""The training loop: data -> sharded train step -> metrics, eval, checkpoints, resume, SIGTERM.

The device never waits for the host: batches are read and put on the device ahead of the step
(drt_jax.train.prefetch), metrics are read one step behind (drt_jax.train.logger), and the host waits
for the device only before a checkpoint, where the non-finite guard must see every step, and, with
several processes, at logging steps, where they agree on stopping.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
import signal
import subprocess
import time
from typing import Any

import jax
import numpy as np

from drt_jax.data.config import TASK_FIELDS, DataError
from drt_jax.kernels import kernel_report
from drt_jax.train import mesh as mesh_lib
from drt_jax.train.bundle import import_note
from drt_jax.train.checkpoints import Checkpointer, CheckpointError
from drt_jax.train.config import ConfigError, RunConfig, resolve_run_config
from drt_jax.train.logger import StepLogger
from drt_jax.train.metrics import MetricWriter, peak_flops_per_device, train_flops_per_sequence
from drt_jax.train.optim import make_optimizer
from drt_jax.train.prefetch import DevicePrefetcher
from drt_jax.train.profiling import StepProfiler
from drt_jax.train.step import init_state, make_eval_step, make_train_step, resolve_remat, state_spec

log = logging.getLogger(__name__)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


ARCHIVE_COMMIT = pathlib.Path(__file__).resolve().parents[1] / "archive_commit.txt"


def archive_commit() -> str:
    """The commit a tree exported by `git archive` (a release tarball, a GitHub zip) was cut from: git
    writes it into archive_commit.txt (.gitattributes: export-subst); "unknown" in a checkout, where the
    file holds its unexpanded placeholder, or when the file is missing."""
    try:
        text = ARCHIVE_COMMIT.read_text().strip()
    except OSError:
        return "unknown"
    return text if re.fullmatch(r"[0-9a-f]{7,40}", text) else "unknown"


def git_commit() -> str:
    """The commit of the code that runs ("-dirty" with uncommitted changes). Where the project is not a
    git checkout of its own, the commit an exported tree was cut from (`archive_commit`), else "unknown":
    an exported tree inside another repository would otherwise report that repository's commit."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if top.returncode or pathlib.Path(top.stdout.strip()).resolve() != REPO_ROOT:
            return archive_commit()
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return archive_commit()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return archive_commit()


class _StopFlag:
    """Set by SIGTERM (and SIGINT when asked): the loop saves a checkpoint and returns."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def install(self, signals=(signal.SIGTERM,)):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        for s in signals:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, old in self._old.items():
            signal.signal(s, old)


def _sync_stop(local_stop: bool) -> bool:
    """All processes agree to stop if any of them got a signal."""
    if jax.process_count() == 1:
        return local_stop
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([int(local_stop)], np.int32))
    return bool(np.max(flags))


def _batch_fields(batch: dict, keys=("tokens", "mask")) -> dict:
    """The batch's `keys`: a missing mask is all ones, missing task fields are zeros."""
    out = {}
    for k in keys:
        if k in batch:
            out[k] = batch[k]
        else:
            out[k] = (np.ones_like if k == "mask" else np.zeros_like)(batch["tokens"], dtype=np.int32)
    return out


def _init_params_from(state: dict, run_dir: str, spec, tx) -> dict:
    """The state with another run's latest parameters (checked against this model's shapes) and a fresh
    optimizer state for them."""
    from drt_jax.train.checkpoints import load_for_eval

    _, params, _ = load_for_eval(run_dir)
    want = jax.tree.map(lambda x: x.shape, spec.abstract["params"])
    have = jax.tree.map(lambda x: tuple(x.shape), params)
    if jax.tree.structure(want) != jax.tree.structure(have) or want != have:
        raise ConfigError(f"train.init_from={run_dir}: its parameters do not fit this model's config; "
                          "use the same model settings as that run (sizes, layers, vocabulary)")
    params = jax.device_put(params, spec.param_shardings)
    opt_state = jax.jit(tx.init, out_shardings=spec.shardings["opt_state"])(params)
    return {**state, "params": params, "opt_state": opt_state}


@dataclasses.dataclass
class Summary:
    run_dir: str
    start_step: int
    end_step: int
    first_loss: float | None
    last_loss: float | None
    eval_loss: float | None
    tokens_per_s: float | None
    mfu: float | None
    wall_s: float
    stopped_by_signal: bool = False


def register_model_tasks(run: RunConfig, tokenizer=None) -> None:
    """(Re-)registers the NIAH fine-tuning tasks when the mixture names them: at the model's chunk size
    (the question's end is placed on the model's own chunks, spec 7.5), in the run's layout
    (data.niah_align) with its number of keyed distractors (data.niah_distractors), and with haystacks
    from the training split of the run's own corpus (the text the model is learning; held-out files stay
    out)."""
    if any(name.startswith("niah") for name, _ in run.data.mixture):
        from drt_jax.data import load_tokenizer
        from drt_jax.data.shards import split_tokens
        from drt_jax.tasks.niah import register_niah_tasks

        tokenizer = load_tokenizer(run.data.tokenizer) if tokenizer is None else tokenizer
        haystack = split_tokens(run.data, tokenizer, "train", HAYSTACK_TOKENS, progress=True)
        register_niah_tasks(chunk_size=run.model.chunk_size, haystack=haystack, align=run.data.niah_align,
                            n_distractors=run.data.niah_distractors, overwrite=True)


# Haystack windows are drawn at random offsets of this many training tokens (about 4 MB as int32).
HAYSTACK_TOKENS = 1 << 22


@dataclasses.dataclass
class Trainer:
    """Everything a run needs before its first step (see `setup`)."""

    run: RunConfig
    tokenizer: Any
    mesh: Any
    batch_sharding: Any
    data_cfg: Any
    train_iter: Any
    train_keys: tuple[str, ...]
    spec: Any
    ckpt: Checkpointer
    state: dict
    start: int
    step_fn: Any
    eval_fn: Any
    is_main: bool
    eval_disabled: bool = False  # set once the held-out split turns out unusable

    @property
    def tokens_per_step(self) -> int:
        return self.run.train.batch * self.run.data.seq_len

    def to_device(self, fields: dict) -> dict:
        return mesh_lib.global_batch(fields, self.batch_sharding, self.run.train.batch)

    def evaluate(self, params, print_fn=print) -> float | None:
        """Mean held-out loss over train.eval_steps batches (None, once, if the split is unusable)."""
        from drt_jax.data import build_eval_iterator

        if self.eval_disabled:
            return None
        try:
            it = build_eval_iterator(self.data_cfg, self.tokenizer, progress=False)
        except DataError as err:
            log.warning("held-out evaluation skipped: %s", err)
            print_fn(f"eval skipped: {err}")
            self.eval_disabled = True
            return None
        total, count = 0.0, 0.0
        for i, batch in enumerate(it):
            if i >= self.run.train.eval_steps:
                break
            s, c = self.eval_fn(params, self.to_device(_batch_fields(batch)))
            total += float(s)
            count += float(c)
        return total / count if count else None


def setup(run: RunConfig, *, print_fn=print) -> Trainer:
    """Resolves the config, builds the mesh, data, optimizer and jitted steps, and restores (or
    initialises) the state from the run folder."""
    from drt_jax.data import build_train_iterator, load_tokenizer

    mesh_lib.maybe_initialize_distributed(run.mesh)
    is_main = jax.process_index() == 0
    tokenizer = load_tokenizer(run.data.tokenizer)
    run = resolve_run_config(run, tokenizer)
    tc = run.train
    mesh = mesh_lib.make_mesh(run.mesh)
    rules = run.mesh.rules
    n_proc = jax.process_count()
    shards = mesh_lib.batch_shards(mesh, rules)
    micro = tc.batch // tc.grad_accum
    if tc.batch % n_proc or micro % shards:
        raise ConfigError(
            f"train.batch={tc.batch} with grad_accum={tc.grad_accum} gives micro-batches of {micro} sequences, which "
            f"must divide over {shards} batch shards (mesh data x fsdp) and {n_proc} processes; change train.batch, "
            "mesh.data or mesh.fsdp"
        )
    mesh_lib.check_kernel_split(run.model, mesh, rules)
    data_cfg = dataclasses.replace(run.data, batch_size=tc.batch // n_proc)
    register_model_tasks(run, tokenizer)
    train_iter = build_train_iterator(data_cfg, tokenizer, progress=is_main)

    tx, schedule = make_optimizer(run.optim, tc.steps)
    spec = state_spec(run.model, tx, mesh, rules)
    ckpt = Checkpointer(run.run_dir, keep=tc.keep_checkpoints, async_save=tc.async_checkpoints)
    say = print_fn if is_main else (lambda *a: None)
    state = ckpt.restore_newest_good(spec.abstract, model=run.model, data_iter=train_iter, resume_step=tc.resume_step, say=say)
    if state is not None:
        latest = int(jax.device_get(state["step"]))
        done = " (train.steps reached: nothing to do; raise train.steps to go on)" if latest >= tc.steps else ""
        say(f"resumed {run.run_dir} from step {latest}{done}")
        restarted = import_note(run.run_dir, latest)
        if restarted:
            say(restarted)
    else:
        state = init_state(run.model, tx, spec, tc.seed)
        if tc.init_from:
            state = _init_params_from(state, tc.init_from, spec, tx)
            say(f"initialised the parameters from {tc.init_from} (optimizer, step and data start afresh)")
    start = int(jax.device_get(state["step"]))
    if is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "config.json").write_text(run.to_json())
        (run.run_dir / "git_commit.txt").write_text(git_commit() + "\n")

    say(kernel_report(run.model))
    batch_sh = mesh_lib.batch_sharding(mesh, rules)
    # Task mixtures carry answer/needle marks: the step then reports corpus and answer losses and recall.
    train_keys = ("tokens", "mask") + (TASK_FIELDS if run.data.mixture else ())
    build = lambda cfg: make_train_step(cfg, tx, schedule, spec, batch_sh, grad_accum=tc.grad_accum,  # noqa: E731
                                        block_size=tc.loss_block_size, batch_keys=train_keys,
                                        answer_weight=tc.answer_loss_weight, logits_dtype=tc.loss_logits_dtype,
                                        tasks=tuple(name for name, _ in run.data.mixture))
    batch_abs = {k: jax.ShapeDtypeStruct((tc.batch, run.data.seq_len), np.int32, sharding=batch_sh) for k in train_keys}
    _, step_fn = resolve_remat(run.model, build, (spec.abstract, batch_abs), say=say)
    eval_fn = make_eval_step(run.model, spec, batch_sh, block_size=tc.loss_block_size, logits_dtype=tc.loss_logits_dtype)
    return Trainer(run=run, tokenizer=tokenizer, mesh=mesh, batch_sharding=batch_sh, data_cfg=data_cfg,
                   train_iter=train_iter, train_keys=train_keys, spec=spec, ckpt=ckpt, state=state, start=start,
                   step_fn=step_fn, eval_fn=eval_fn, is_main=is_main)


def _progress_text(row: dict) -> str:
    task = f" answer {row['answer_loss']:.2f}" if "answer_loss" in row else ""
    task += f" recall {row['recall_g0']:.2f}" if "recall_g0" in row else ""
    task += f" weight {row['needle_weight_g0']:.2f}" if "needle_weight_g0" in row else ""
    if not row.get("tokens_per_s"):
        return f"loss {row['loss']:.3f}{task}"
    mfu = "n/a" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%"
    return f"loss {row['loss']:.3f}{task} tok/s {row['tokens_per_s']:,.0f} MFU {mfu}"


def train(run: RunConfig, *, stop_at: int | None = None, print_fn=print, batch_hook=None) -> Summary:
    """Trains `run` (resuming from its run folder if it holds checkpoints).

    stop_at: stop (with a checkpoint) once this step is reached, as a preemption would; the schedule
    still follows train.steps (default: train.stop_at_step). batch_hook(step, local_numpy_batch) sees
    every batch (tests).
    """
    t_start = time.time()
    t = setup(run, print_fn=print_fn)
    run, tc, is_main, ckpt = t.run, t.run.train, t.is_main, t.ckpt
    stop_at = tc.stop_at_step if stop_at is None else stop_at
    run_dir = run.run_dir
    writer = MetricWriter(run_dir, enabled=is_main)
    peak = peak_flops_per_device()
    pbar = None
    if is_main and tc.progress_bar:
        from tqdm import tqdm

        pbar = tqdm(total=tc.steps, initial=t.start, desc=run.name, dynamic_ncols=True, mininterval=1.0)

    def on_row(step: int, row: dict) -> None:
        if step == t.start + 1 and is_main:
            print_fn(f"step {step}: loss {row['loss']:.4f} (start)")
        writer.write(step, {k: v for k, v in row.items() if v is not None})
        if pbar is not None:
            pbar.set_postfix_str(_progress_text(row))

    logger = StepLogger(tokens_per_step=t.tokens_per_step,
                        flops_per_step=train_flops_per_sequence(run.model, run.data.seq_len) * tc.batch,
                        peak_flops=peak * jax.device_count() if peak else None, on_row=on_row)
    logger.last_saved = t.start if t.start > 0 else None
    profiler = StepProfiler(run_dir / "profile", t.start + tc.profile_start, tc.profile_steps)
    stop = _StopFlag().install()
    batches = DevicePrefetcher(t.train_iter, lambda b: _batch_fields(b, t.train_keys), t.to_device,
                               keep_local=batch_hook is not None)
    multi = jax.process_count() > 1
    state, step, position = t.state, t.start, None
    eval_loss, signalled = None, False

    def save(step_now: int) -> None:
        with jax.profiler.TraceAnnotation("checkpoint"):
            logger.check()
            ckpt.save(step_now, state, model=run.model, data_iter=position, force=True)
            logger.last_saved = step_now

    try:
        if t.start >= tc.steps and is_main:
            print_fn(f"nothing to do: {run_dir} is at step {t.start} >= train.steps={tc.steps}")
        while step < tc.steps:
            profiler.before(step)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                with jax.profiler.TraceAnnotation("next_batch"):
                    local, batch, position = next(batches)
                if batch_hook is not None:
                    batch_hook(step, local)
                with jax.profiler.TraceAnnotation("dispatch"):
                    state, metrics = t.step_fn(state, batch)
                step += 1
                log_now = step == t.start + 1 or step % tc.log_every == 0 or step == tc.steps
                with jax.profiler.TraceAnnotation("metrics"):
                    logger.push(step, metrics, log=log_now)
                if pbar is not None:
                    pbar.update(1)
                if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                    with jax.profiler.TraceAnnotation("eval"):
                        eval_loss = t.evaluate(state["params"], print_fn)
                    if eval_loss is not None:
                        writer.write(step, {"loss": eval_loss}, prefix="eval")
                with jax.profiler.TraceAnnotation("stop_check"):
                    out_of_time = bool(tc.time_limit_s) and time.time() - t_start >= tc.time_limit_s
                    # Processes agree on stopping at logging steps only: agreeing is a round trip.
                    local_stop = stop.signum is not None or out_of_time
                    stopping = (_sync_stop(local_stop) if (not multi or log_now) else False) or (
                        stop_at is not None and step >= stop_at)
                if step % tc.checkpoint_every == 0 or step == tc.steps or stopping:
                    save(step)
            profiler.after(step, state)
            if stopping:
                signalled = stop.signum is not None
                if is_main:
                    why = " on SIGTERM" if signalled else (f" (train.time_limit_s={tc.time_limit_s:g} reached)" if out_of_time
                                                           else f" (stop at step {stop_at})")
                    print_fn(f"stopping at step {step}{why}; checkpoint saved to {ckpt.directory}")
                break
        logger.check()
        if step >= tc.steps and step > t.start:
            eval_loss = t.evaluate(state["params"], print_fn)
            if eval_loss is not None:
                writer.write(step, {"loss": eval_loss}, prefix="eval")
        if logger.last_saved != step and step > t.start:
            save(step)
    finally:
        batches.close()
        profiler.stop()
        if pbar is not None:
            pbar.close()
        ckpt.close()
        writer.close()
        stop.restore()
    summary = Summary(
        run_dir=str(run_dir), start_step=t.start, end_step=step, first_loss=logger.first_loss, last_loss=logger.last_loss,
        eval_loss=eval_loss, tokens_per_s=logger.tokens_per_s, mfu=logger.mfu, wall_s=time.time() - t_start,
        stopped_by_signal=signalled,
    )
    if is_main and step > t.start:
        ev = "n/a" if eval_loss is None else f"{eval_loss:.4f}"
        tps, mfu = logger.tokens_per_s, logger.mfu
        print_fn(f"step {step}: loss {logger.last_loss:.4f} (end), held-out loss {ev}, "
                 f"{'n/a' if tps is None else f'{tps:,.0f}'} tokens/s, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, "
                 f"{summary.wall_s:.0f} s; run folder {run_dir}")
    return summary


__all__ = ["train", "setup", "Trainer", "Summary", "CheckpointError"]
