"""The trainer: run config, mesh + logical sharding, optimizer, sharded step, loop, checkpoints, metrics.

    from drt_jax.train import load_run_config, train
    summary = train(load_run_config("tiny", ["train.steps=300"]))

`drt_jax.train.checkpoints.load_for_eval(run_dir, step=None)` reads a run folder back for evaluation.
Submodules are imported lazily so that `drt_jax.train.config` stays light.
"""

from drt_jax.train.config import (
    MeshConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    load_run_config,
)


def train(*args, **kwargs):
    from drt_jax.train.loop import train as _train

    return _train(*args, **kwargs)


__all__ = ["MeshConfig", "OptimConfig", "RunConfig", "TrainConfig", "apply_overrides", "load_run_config", "train"]
