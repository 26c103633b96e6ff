"""Device mesh, logical-axis sharding and the multi-host runtime.

Sharding is declared once: parameters carry logical axis names (model code), `MeshConfig.rules`
maps them to the mesh axes (data, fsdp, tensor), and everything here turns that into NamedShardings.
The mesh uses AxisType.Auto (classic GSPMD propagation), see jax-ecosystem-notes B4.
"""

from __future__ import annotations

import logging
import math
import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from drt_jax.config import ConfigError, ModelConfig
from drt_jax.train.config import MESH_AXES, MeshConfig
from pallas_kernels.per_shard import KernelMesh

log = logging.getLogger(__name__)


def maybe_initialize_distributed(cfg: MeshConfig) -> bool:
    """Calls jax.distributed.initialize when several processes were asked for (config or env vars).

    Must run before anything touches jax devices. Returns True if the distributed runtime is on.
    """
    coordinator = cfg.coordinator or os.environ.get("DRT_COORDINATOR")
    num = cfg.num_processes if cfg.num_processes is not None else os.environ.get("DRT_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id is not None else os.environ.get("DRT_PROCESS_ID")
    if coordinator is None and num is None:
        return False
    if coordinator is None or num is None or pid is None:
        raise ConfigError(
            "multi-process launch needs all of mesh.coordinator, mesh.num_processes, mesh.process_id "
            "(or DRT_COORDINATOR, DRT_NUM_PROCESSES, DRT_PROCESS_ID)"
        )
    if int(num) <= 1:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num), process_id=int(pid))
    log.info("jax.distributed: process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count())
    return True


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    shape = cfg.shape(len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes from dimensions they do not divide (those dimensions are replicated)."""
    out = []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is not None and shape[i] % _axis_size(mesh, axes):
            log.debug("dimension %d of size %d is not divisible by %s; replicating it", i, shape[i], axes)
            axes = None
        out.append(axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def logical_shardings(boxed_abstract, mesh: Mesh, rules):
    """A boxed (LogicallyPartitioned) abstract tree -> NamedShardings for its unboxed twin.

    Uses nn.get_partition_spec + nn.logical_to_mesh_sharding, then replicates dimensions the
    mesh axes do not divide (e.g. a 259-entry byte vocabulary on tensor=2).
    """
    logical = nn.get_partition_spec(boxed_abstract)
    mesh_shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
    shapes = nn.unbox(boxed_abstract)
    return jax.tree.map(
        lambda s, x: NamedSharding(mesh, fit_spec(s.spec, x.shape, mesh)),
        mesh_shardings, shapes, is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of a [batch, seq] token array: batch over the mesh axes that `batch` maps to."""
    spec = nn.logical_to_mesh_axes(("batch", None), rules)
    return NamedSharding(mesh, spec)


def batch_shards(mesh: Mesh, rules) -> int:
    spec = batch_sharding(mesh, rules).spec
    return _axis_size(mesh, spec[0]) if len(spec) else 1


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def kernel_mesh(mesh: Mesh, rules) -> KernelMesh:
    """Where attention kernels run per shard: rows over the mesh axes of `batch`, heads over those of
    `heads` (less any the batch already takes: one mesh axis cannot split two dimensions)."""
    batch, heads = (_axes(a) for a in nn.logical_to_mesh_axes(("batch", "heads"), rules))
    return KernelMesh(mesh, batch, tuple(a for a in heads if a not in batch))


def check_kernel_split(model: ModelConfig, mesh: Mesh, rules) -> None:
    """One-line ConfigError unless query and key/value heads both split evenly over the head axes.

    The kernels run per head shard and GQA needs each shard's query heads to use only its own key/value
    heads, so both counts must divide (checked before anything compiles)."""
    km = kernel_mesh(mesh, rules)
    shards = km.size(km.heads)
    if model.n_heads % shards or model.kv_heads % shards:
        fields = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in km.heads)
        raise ConfigError(
            f"model.n_heads={model.n_heads} and model.n_kv_heads={model.kv_heads} must both divide over {fields} "
            f"(the attention kernels run per head shard); change {' or '.join(f'mesh.{a}' for a in km.heads)}"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict, sharding: NamedSharding, global_rows: int) -> dict:
    """Per-host numpy batches -> global jax.Arrays (jax.make_array_from_process_local_data)."""
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        global_shape = (global_rows, *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out
