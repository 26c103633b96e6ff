"""Checkpoints with orbax's CheckpointManager, and `load_for_eval`.

A run folder:
  config.json        the full RunConfig (model ids already resolved from the tokenizer)
  git_commit.txt     the commit the run started from (plus "-dirty" when the tree had changes; from a
                     `git archive` export, the commit it was cut from; else "unknown")
  checkpoints/<step>/ items: params, opt_state, meta (step, rng), data (grain iterator state, one
                     file per process), model (the ModelConfig as JSON); orbax writes each step to a
                     temporary folder and renames it only once complete, so a crash or kill -9 during
                     an async save leaves the previous step as the latest restorable one.
  checkpoints/damaged-<step>/  a checkpoint that could not be read completely, moved aside (never
                     deleted) when an older one could; the run resumed from that older one.
  checkpoints/unused-<step>/   a checkpoint newer than an explicit train.resume_step, moved aside.
  metrics.jsonl, tensorboard/

Only names that are plain integers are steps to orbax, so the moved folders are never listed again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys

import jax
import orbax.checkpoint as ocp

from drt_jax.config import ConfigError, ModelConfig
from drt_jax.train.config import RunConfig, model_mismatch

log = logging.getLogger(__name__)


class CheckpointError(ConfigError):
    """A run folder or checkpoint that cannot be used; the message is one line naming the fix."""


class UnreadableCheckpoint(Exception):
    """A checkpoint that cannot be read completely (damaged); the message is the one-line reason."""


def _abs(path) -> pathlib.Path:
    return pathlib.Path(path).expanduser().absolute()


def _reason(err: BaseException) -> str:
    """A one-line, bounded description of why a checkpoint could not be read (tensorstore's are long)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _silence_closed_loop_callbacks() -> None:
    """After a failed orbax read, tensorstore still completes the reads it had started: their results
    reach the event loop orbax already closed (Python prints a "RuntimeError: Event loop is closed"
    traceback per read), and their errors reach asyncio's "Task exception was never retrieved" log,
    each of which would bury the one-line message. Only those two kinds are dropped: the closed-loop
    error, and unretrieved task errors from tensorstore (their text carries a tensorstore_spec)."""
    previous = sys.unraisablehook
    if getattr(previous, "_drt_closed_loop_filter", False):
        return

    closed = lambda exc: isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

    def hook(unraisable):
        if not closed(unraisable.exc_value):
            previous(unraisable)

    # tensorstore's own threads report a failing callback through PyErr_Print, i.e. sys.excepthook.
    previous_except = sys.excepthook

    def excepthook(kind, value, tb):
        if not closed(value):
            previous_except(kind, value, tb)

    def unretrieved_tensorstore_error(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage().startswith("Task exception was never retrieved") and "tensorstore_spec" in str(exc))

    hook._drt_closed_loop_filter = True
    sys.unraisablehook = hook
    sys.excepthook = excepthook
    logging.getLogger("asyncio").addFilter(unretrieved_tensorstore_error)


def _on_main_then_sync(fn, tag: str) -> None:
    """Runs fn on process 0 only (one shared file system) and makes every process wait for it."""
    if jax.process_index() == 0:
        fn()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(tag)


class Checkpointer:
    """One CheckpointManager per run (create it after jax.distributed.initialize)."""

    def __init__(self, run_dir, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        # Before any read: a failed read's late errors can surface before the failure is caught.
        _silence_closed_loop_callbacks()
        self.directory = _abs(run_dir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
            read_only=read_only, cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, *, model: ModelConfig, data_iter=None, force: bool = False) -> bool:
        items = {
            "params": ocp.args.StandardSave(state["params"]),
            "opt_state": ocp.args.StandardSave(state["opt_state"]),
            "meta": ocp.args.StandardSave({"step": state["step"], "rng": state["rng"]}),
            "model": ocp.args.JsonSave(dataclasses.asdict(model)),
        }
        if data_iter is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def saved_model(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]

    def check_model(self, step: int, model: ModelConfig, *, saved: dict | None = None) -> None:
        problem = model_mismatch(self.saved_model(step) if saved is None else saved, model)
        if problem:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not match the config ({problem}); "
                "use a fresh train.run_dir or restore the original model settings"
            )

    def restore(self, step: int, abstract_state: dict, *, data_iter=None) -> dict:
        """Restores onto the shardings carried by `abstract_state`'s ShapeDtypeStructs (any mesh)."""
        items = {
            "params": ocp.args.StandardRestore(abstract_state["params"]),
            "opt_state": ocp.args.StandardRestore(abstract_state["opt_state"]),
            "meta": ocp.args.StandardRestore({"step": abstract_state["step"], "rng": abstract_state["rng"]}),
        }
        if data_iter is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return {"params": out["params"], "opt_state": out["opt_state"], "step": out["meta"]["step"], "rng": out["meta"]["rng"]}

    def move_aside(self, step: int, prefix: str) -> pathlib.Path:
        """Renames checkpoints/<step> to checkpoints/<prefix><step> (a suffix .1, .2, ... if taken)."""
        target, n = self.directory / f"{prefix}{step}", 0
        while target.exists():
            n += 1
            target = self.directory / f"{prefix}{step}.{n}"
        _on_main_then_sync(lambda: (self.directory / str(step)).rename(target), f"drt_move_aside_{step}")
        self.manager.reload()
        return target

    def restore_newest_good(self, abstract_state: dict, *, model: ModelConfig, data_iter=None,
                            resume_step: int | None = None, say=print) -> dict | None:
        """The state of the newest checkpoint that reads completely (every item), or None for a fresh start.

        Newer checkpoints that cannot be read are moved to checkpoints/damaged-<step> only once an older
        one has been read: a failure shared by all of them (say, a changed optimizer) moves nothing.
        resume_step=N restores exactly step N (0: start afresh) and moves newer checkpoints to
        checkpoints/unused-<step>. `say` gets one line per moved checkpoint. Raises CheckpointError
        (one line) when the model differs, nothing is readable, or step N is missing or unreadable.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if resume_step is not None:
            return self._restore_pinned(resume_step, steps, abstract_state, model=model, data_iter=data_iter, say=say)
        failures = []
        for step in steps:
            try:
                state = self.restore_readable(step, abstract_state, model=model, data_iter=data_iter)
            except UnreadableCheckpoint as err:
                failures.append((step, str(err)))
                continue
            for bad, reason in failures:
                target = self.move_aside(bad, "damaged-")
                say(f"checkpoint {bad} is damaged ({reason}); moved it to {target} and resumed from step {step}")
            return state
        if failures:
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be read (steps {', '.join(str(s) for s, _ in failures)}; "
                f"step {failures[0][0]}: {failures[0][1]}); pass --set train.resume_step=0 to start "
                "over in this run folder (the unreadable ones are moved aside, not deleted) or use a new train.run_dir"
            )
        return None

    def _restore_pinned(self, resume_step, steps, abstract_state, *, model, data_iter, say) -> dict | None:
        if resume_step and resume_step not in steps:
            raise CheckpointError(
                f"train.resume_step={resume_step} is not among the checkpoints of {self.directory} ({sorted(steps)}); "
                "pick one of them, or 0 to start over"
            )
        state = None
        if resume_step:
            try:
                state = self.restore_readable(resume_step, abstract_state, model=model, data_iter=data_iter)
            except UnreadableCheckpoint as err:
                raise CheckpointError(
                    f"checkpoint {self.directory}/{resume_step} cannot be read ({err}); pick another train.resume_step"
                ) from None
        for newer in (s for s in steps if s > resume_step):
            target = self.move_aside(newer, "unused-")
            say(f"checkpoint {newer} is newer than train.resume_step={resume_step}; moved it to {target}")
        return state

    def _check_readable_model(self, step: int, model: ModelConfig) -> None:
        """check_model, with an unreadable model config raised as UnreadableCheckpoint (a mismatch stays a CheckpointError)."""
        try:
            saved = self.saved_model(step)
        except Exception as err:  # orbax, tensorstore and grain raise many types for unreadable files
            raise UnreadableCheckpoint(f"model config: {_reason(err)}") from None
        if not isinstance(saved, dict):
            raise UnreadableCheckpoint(f"model config is a {type(saved).__name__}, not a JSON object")
        self.check_model(step, model, saved=saved)

    def restore_readable(self, step: int, abstract_state: dict, *, model: ModelConfig, data_iter) -> dict:
        """restore() after check_model(); any read failure becomes UnreadableCheckpoint, a model mismatch stays a
        CheckpointError."""
        self._check_readable_model(step, model)
        try:
            state = self.restore(step, abstract_state, data_iter=data_iter)
        except Exception as err:  # as above: the items are read by orbax, tensorstore and grain
            raise UnreadableCheckpoint(_reason(err)) from None
        return state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_only_checkpointer(run_dir) -> Checkpointer:
    """A read-only manager, without orbax's warnings about the options read-only mode overrides."""
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        return Checkpointer(run_dir, read_only=True, async_save=False)
    finally:
        absl_logging.set_verbosity(level)


def read_run_config(run_dir) -> RunConfig:
    path = _abs(run_dir) / "config.json"
    if not _abs(run_dir).is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist; pass the runs/<name> folder a training run wrote")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {run_dir} is not a complete run folder; pass the folder train.py wrote")
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path} cannot be read ({' '.join(str(err).split())}); restore it from the run's launch") from None


def load_for_eval(run_dir, step: int | None = None):
    """run folder -> (ModelConfig, params (unboxed pytree of arrays, fp32 master weights), tokenizer spec).

    step=None takes the newest checkpoint whose model config and parameters read completely, under the
    rule training follows: a newer one that cannot be read is moved to checkpoints/damaged-<step> (never
    deleted) with a one-line warning, once an older one has read. The params are placed on the first
    local device. Raises
    CheckpointError (one line) for a missing or partial run folder, an unknown or unreadable step, or
    a run whose checkpoints are all unreadable.
    """
    from drt_jax.train.step import boxed_param_shapes

    run = read_run_config(run_dir)
    ckpt_dir = _abs(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir} is missing: the run saved no checkpoint yet; train longer or pass another run folder")
    ckpt = read_only_checkpointer(run_dir)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {ckpt_dir}; train until train.checkpoint_every or the end of a run")
        if step is not None and step not in steps:
            raise CheckpointError(f"step {step} is not among the checkpoints of {run_dir} ({steps}); pass one of them or step=None")
        import flax.linen as nn

        device = jax.local_devices()[0]
        sharding = jax.sharding.SingleDeviceSharding(device)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), nn.unbox(boxed_param_shapes(run.model))
        )
        failures = []
        for candidate in [step] if step is not None else sorted(steps, reverse=True):
            try:
                params = _read_params(ckpt, candidate, abstract, run.model)
            except UnreadableCheckpoint as err:
                failures.append((candidate, str(err)))
                continue
            for bad, reason in failures:
                target = ckpt_dir / f"damaged-{bad}"
                (ckpt_dir / str(bad)).rename(target)
                log.warning("checkpoint %s is damaged (%s); moved it to %s and evaluated step %s", bad, reason, target, candidate)
            return run.model, params, run.data.tokenizer
    finally:
        ckpt.manager.close()
    if step is not None:
        raise CheckpointError(
            f"step {step} of {ckpt_dir} cannot be read ({failures[0][1]}); it is damaged: pick another step of {sorted(steps)}"
        )
    raise CheckpointError(
        f"no checkpoint in {ckpt_dir} can be read (steps {', '.join(str(s) for s, _ in failures)}; "
        f"step {failures[0][0]}: {failures[0][1]}); "
        "restore the run folder from a copy or pass another run folder"
    )


def _read_params(ckpt: Checkpointer, step: int, abstract, model: ModelConfig):
    """The checkpoint's parameters after its model config was checked; UnreadableCheckpoint when a file fails."""
    ckpt._check_readable_model(step, model)
    try:
        return ckpt.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))["params"]
    except Exception as err:  # orbax and tensorstore raise many types for unreadable files
        raise UnreadableCheckpoint(_reason(err)) from None
