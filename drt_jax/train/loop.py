"""The training loop: data -> sharded train step -> metrics, eval, checkpoints, resume, SIGTERM."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.data.config import TASK_FIELDS, DataError
from drt_jax.train import mesh as mesh_lib
from drt_jax.train.bundle import import_note
from drt_jax.train.checkpoints import Checkpointer, CheckpointError
from drt_jax.train.config import ConfigError, RunConfig, resolve_run_config
from drt_jax.train.finite import FiniteWatch
from drt_jax.train.metrics import MetricWriter, peak_flops_per_device, train_flops_per_sequence
from drt_jax.train.optim import make_optimizer
from drt_jax.train.profiling import StepProfiler
from drt_jax.train.step import diagnostic_means, init_state, make_eval_step, make_train_step, state_spec

log = logging.getLogger(__name__)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
    (the question must end on the model's own chunk boundary, spec 7.5) and with haystacks from the
    training split of the run's own corpus (the text the model is learning; held-out files stay out)."""
    if any(name.startswith("niah") for name, _ in run.data.mixture):
        from drt_jax.data import load_tokenizer
        from drt_jax.data.shards import split_tokens
        from drt_jax.tasks.niah import register_niah_tasks

        tokenizer = load_tokenizer(run.data.tokenizer) if tokenizer is None else tokenizer
        haystack = split_tokens(run.data, tokenizer, "train", HAYSTACK_TOKENS, progress=True)
        register_niah_tasks(chunk_size=run.model.chunk_size, haystack=haystack, overwrite=True)


# Haystack windows are drawn at random offsets of this many training tokens (about 4 MB as int32).
HAYSTACK_TOKENS = 1 << 22


def train(run: RunConfig, *, stop_at: int | None = None, print_fn=print, batch_hook=None) -> Summary:
    """Trains `run` (resuming from its run folder if it holds checkpoints).

    stop_at: stop (with a checkpoint) once this step is reached, as a preemption would; the schedule
    still follows train.steps (default: train.stop_at_step). batch_hook(step, local_numpy_batch) sees every batch (tests).
    """
    t_start = time.time()
    from drt_jax.data import build_eval_iterator, build_train_iterator, load_tokenizer

    mesh_lib.maybe_initialize_distributed(run.mesh)
    is_main = jax.process_index() == 0
    tokenizer = load_tokenizer(run.data.tokenizer)
    run = resolve_run_config(run, tokenizer)
    tc = run.train
    stop_at = tc.stop_at_step if stop_at is None else stop_at
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
    run_dir = run.run_dir
    train_iter = build_train_iterator(data_cfg, tokenizer, progress=is_main)

    tx, schedule = make_optimizer(run.optim, tc.steps)
    spec = state_spec(run.model, tx, mesh, rules)
    ckpt = Checkpointer(run_dir, keep=tc.keep_checkpoints, async_save=tc.async_checkpoints)
    say = print_fn if is_main else (lambda *a: None)
    state = ckpt.restore_newest_good(spec.abstract, model=run.model, data_iter=train_iter, resume_step=tc.resume_step, say=say)
    latest = None if state is None else int(jax.device_get(state["step"]))
    if latest is not None:
        done = " (train.steps reached: nothing to do; raise train.steps to go on)" if latest >= tc.steps else ""
        say(f"resumed {run_dir} from step {latest}{done}")
        restarted = import_note(run_dir, latest)
        if restarted:
            say(restarted)
    else:
        state = init_state(run.model, tx, spec, tc.seed)
        if tc.init_from:
            state = _init_params_from(state, tc.init_from, spec, tx)
            if is_main:
                print_fn(f"initialised the parameters from {tc.init_from} (optimizer, step and data start afresh)")
    start = int(jax.device_get(state["step"]))
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(run.to_json())
        (run_dir / "git_commit.txt").write_text(git_commit() + "\n")

    batch_sh = mesh_lib.batch_sharding(mesh, rules)
    # Task mixtures carry answer/needle marks: the step then reports corpus and answer losses and recall.
    train_keys = ("tokens", "mask") + (TASK_FIELDS if run.data.mixture else ())
    step_fn = make_train_step(run.model, tx, schedule, spec, batch_sh, grad_accum=tc.grad_accum,
                              block_size=tc.loss_block_size, batch_keys=train_keys, answer_weight=tc.answer_loss_weight)
    eval_fn = make_eval_step(run.model, spec, batch_sh, block_size=tc.loss_block_size)
    writer = MetricWriter(run_dir, enabled=is_main)

    tokens_per_step = tc.batch * run.data.seq_len
    flops_per_step = train_flops_per_sequence(run.model, run.data.seq_len) * tc.batch
    peak = peak_flops_per_device()
    peak_total = peak * jax.device_count() if peak else None

    eval_state = {"disabled": False}

    def evaluate(params) -> float | None:
        if eval_state["disabled"]:
            return None
        try:
            it = build_eval_iterator(data_cfg, tokenizer, progress=False)
        except DataError as err:
            log.warning("held-out evaluation skipped: %s", err)
            print_fn(f"eval skipped: {err}")
            eval_state["disabled"] = True
            return None
        total, count = 0.0, 0.0
        for i, batch in enumerate(it):
            if i >= tc.eval_steps:
                break
            s, c = eval_fn(params, mesh_lib.global_batch(_batch_fields(batch), batch_sh, tc.batch))
            total += float(s)
            count += float(c)
        return total / count if count else None

    stop = _StopFlag().install()
    last_saved = latest
    first_loss = last_loss = eval_loss = None
    tps = mfu = None
    pbar = None
    if is_main and tc.progress_bar:
        from tqdm import tqdm

        pbar = tqdm(total=tc.steps, initial=start, desc=run.name, dynamic_ncols=True, mininterval=1.0)
    signalled = False
    step = start
    watch = FiniteWatch()
    profiler = StepProfiler(run_dir / "profile", start + tc.profile_start, tc.profile_steps)
    t_last, steps_since = None, 0
    diag_sums = None
    try:
        if start >= tc.steps and is_main:
            print_fn(f"nothing to do: {run_dir} is at step {start} >= train.steps={tc.steps}")
        while step < tc.steps:
            profiler.before(step)
            annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
            annotation.__enter__()
            with jax.profiler.TraceAnnotation("next_batch"):
                local = _batch_fields(next(train_iter), train_keys)
            if batch_hook is not None:
                batch_hook(step, local)
            with jax.profiler.TraceAnnotation("to_device"):
                batch = mesh_lib.global_batch(local, batch_sh, tc.batch)
            with jax.profiler.TraceAnnotation("dispatch"):
                state, metrics = step_fn(state, batch)
            # Diagnostics are summed on the device over the logging interval (no host sync per step).
            diag = metrics.pop("diagnostics", None)
            if diag is not None:
                diag_sums = diag if diag_sums is None else jax.tree.map(jnp.add, diag_sums, diag)
            step += 1
            with jax.profiler.TraceAnnotation("finite_check"):
                watch.push(step, metrics, last_saved)
            steps_since += 1
            if step == start + 1 or step % tc.log_every == 0 or step == tc.steps:
              with jax.profiler.TraceAnnotation("metrics"):
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if diag_sums is not None:
                    m.update(diagnostic_means(jax.device_get(diag_sums)))
                    diag_sums = None
                now = time.time()
                if t_last is not None and steps_since:
                    dt = (now - t_last) / steps_since
                    tps = tokens_per_step / dt
                    mfu = flops_per_step / dt / peak_total if peak_total else None
                t_last, steps_since = now, 0
                last_loss = m["loss"]
                if first_loss is None:
                    first_loss = m["loss"]
                    if is_main:
                        print_fn(f"step {step}: loss {m['loss']:.4f} (start)")
                row = {**m, "tokens_per_s": tps, "mfu": mfu}
                writer.write(step, {k: v for k, v in row.items() if v is not None})
                if pbar is not None:
                    task = f" answer {m['answer_loss']:.2f}" if "answer_loss" in m else ""
                    task += f" recall {m['recall_g0']:.2f}" if "recall_g0" in m else ""
                    pbar.set_postfix_str(
                        f"loss {m['loss']:.3f}{task} tok/s {tps:,.0f} MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}"
                        if tps else f"loss {m['loss']:.3f}{task}"
                    )
                watch.flush()
            if pbar is not None:
                pbar.update(1)
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                eval_loss = evaluate(state["params"])
                if eval_loss is not None:
                    writer.write(step, {"loss": eval_loss}, prefix="eval")
            with jax.profiler.TraceAnnotation("stop_check"):
                out_of_time = bool(tc.time_limit_s) and time.time() - t_start >= tc.time_limit_s
                stopping = _sync_stop(stop.signum is not None or out_of_time) or (stop_at is not None and step >= stop_at)
            if step % tc.checkpoint_every == 0 or step == tc.steps or stopping:
              with jax.profiler.TraceAnnotation("checkpoint"):
                watch.flush()
                ckpt.save(step, state, model=run.model, data_iter=train_iter, force=True)
                last_saved = step
            annotation.__exit__(None, None, None)
            profiler.after(step, state)
            if stopping:
                signalled = stop.signum is not None
                if is_main:
                    why = " on SIGTERM" if signalled else (f" (train.time_limit_s={tc.time_limit_s:g} reached)" if out_of_time
                                                           else f" (stop at step {stop_at})")
                    print_fn(f"stopping at step {step}{why}; checkpoint saved to {ckpt.directory}")
                break
        if step >= tc.steps and step > start:
            eval_loss = evaluate(state["params"])
            if eval_loss is not None:
                writer.write(step, {"loss": eval_loss}, prefix="eval")
        if last_saved != step and step > start:
            watch.flush()
            ckpt.save(step, state, model=run.model, data_iter=train_iter, force=True)
    finally:
        profiler.stop()
        if pbar is not None:
            pbar.close()
        ckpt.close()
        writer.close()
        stop.restore()
    summary = Summary(
        run_dir=str(run_dir), start_step=start, end_step=step, first_loss=first_loss, last_loss=last_loss,
        eval_loss=eval_loss, tokens_per_s=tps, mfu=mfu, wall_s=time.time() - t_start, stopped_by_signal=signalled,
    )
    if is_main and step > start:
        ev = "n/a" if eval_loss is None else f"{eval_loss:.4f}"
        print_fn(f"step {step}: loss {last_loss:.4f} (end), held-out loss {ev}, "
                 f"{'n/a' if tps is None else f'{tps:,.0f}'} tokens/s, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, "
                 f"{summary.wall_s:.0f} s; run folder {run_dir}")
    return summary


__all__ = ["train", "Summary", "CheckpointError"]
