"""Checkpoints with orbax's CheckpointManager, and `load_for_eval`.

A run folder:
  config.json        the full RunConfig (model ids already resolved from the tokenizer)
  git_commit.txt     the commit the run started from (plus "-dirty" when the tree had changes)
  checkpoints/<step>/ items: params, opt_state, meta (step, rng), data (grain iterator state, one
                     file per process), model (the ModelConfig as JSON); orbax writes each step to a
                     temporary folder and renames it only once complete, so a crash or kill -9 during
                     an async save leaves the previous step as the latest restorable one.
  metrics.jsonl, tensorboard/
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import jax
import orbax.checkpoint as ocp

from drt_jax.config import ConfigError, ModelConfig
from drt_jax.train.config import RunConfig, model_mismatch

log = logging.getLogger(__name__)


class CheckpointError(ConfigError):
    """A run folder or checkpoint that cannot be used; the message is one line naming the fix."""


def _abs(path) -> pathlib.Path:
    return pathlib.Path(path).expanduser().absolute()


class Checkpointer:
    """One CheckpointManager per run (create it after jax.distributed.initialize)."""

    def __init__(self, run_dir, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
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

    def check_model(self, step: int, model: ModelConfig) -> None:
        problem = model_mismatch(self.saved_model(step), model)
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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _quiet_read_only(run_dir) -> Checkpointer:
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

    step=None takes the latest complete checkpoint. The params are placed on the first local device.
    Raises CheckpointError (one line) for a missing or partial run folder or an unknown step.
    """
    from drt_jax.train.step import boxed_param_shapes

    run = read_run_config(run_dir)
    ckpt_dir = _abs(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir} is missing: the run saved no checkpoint yet; train longer or pass another run folder")
    ckpt = _quiet_read_only(run_dir)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {ckpt_dir}; train until train.checkpoint_every or the end of a run")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise CheckpointError(f"step {step} is not among the checkpoints of {run_dir} ({steps}); pass one of them or step=None")
        ckpt.check_model(step, run.model)
        import flax.linen as nn

        device = jax.local_devices()[0]
        sharding = jax.sharding.SingleDeviceSharding(device)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), nn.unbox(boxed_param_shapes(run.model))
        )
        params = ckpt.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))["params"]
    except CheckpointError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"checkpoint {ckpt_dir}/{step} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
            "it is partial or from another model: pick another step"
        ) from None
    finally:
        ckpt.manager.close()
    return run.model, params, run.data.tokenizer
