"""Per-shard execution of attention kernels under a device mesh.

XLA cannot partition a custom call it knows nothing about (a Pallas/Triton kernel), and cuDNN
attention's partition rule refuses many shardings ("custom_partitioner: Traceback ..."). So a model
built with a `KernelMesh` (`DRT(cfg, kernel_mesh=...)`, handed down to its layers) runs every kernel
dispatch inside `shard_map`: each device calls the kernel on its own batch rows and heads, and XLA only
moves whole operands at the boundary. Without a kernel mesh (one device, eval, notebooks) kernels are
called directly.

The layout of an operand names each dimension: "batch", "heads" or None. Query heads and key/value
heads both split over the head axes in contiguous blocks, so a shard's query heads use exactly its
own key/value heads (GQA groups stay whole).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

Layout = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class KernelMesh:
    """The mesh kernels run on, and the mesh axes that split their batch and head dimensions."""

    mesh: jax.sharding.Mesh
    batch: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()

    def size(self, axes: tuple[str, ...]) -> int:
        return math.prod(self.mesh.shape[a] for a in axes)


def _shard_map(fn, mesh, in_specs, out_specs):
    # Kernels carry no varying-manual-axes rules, so the check is off; shard_map's transpose then
    # sums the cotangents of operands replicated over an axis (e.g. GCA weights over tensor).
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(fn, mesh, in_specs, out_specs, check_rep=False)


def run(fn: Callable, args: Sequence, layouts: Sequence[Layout], out_layout: Layout | tuple[Layout, ...],
        kernel_mesh: KernelMesh | None = None):
    """fn(*args) -> one array (or a tuple of arrays), run once per shard of `kernel_mesh` (None: one
    direct call).

    args: arrays, or None (passed to every shard as None); layouts: one per arg, a name per dimension;
    out_layout: the output's layout, or a tuple of layouts for a tuple of outputs.
    Raises ValueError when a batch or head dimension does not divide over its mesh axes (the trainer
    checks this at start-up, so only code that declares its own kernel mesh can reach it).
    """
    km = kernel_mesh
    if km is None or km.mesh.size == 1:
        return fn(*args)
    present = [i for i, a in enumerate(args) if a is not None]
    for name, axes in (("batch", km.batch), ("heads", km.heads)):
        sizes = [args[i].shape[layouts[i].index(name)] for i in present if name in layouts[i]]
        for size in sizes:
            if size % km.size(axes):
                raise ValueError(f"kernel {name} dimension of size {size} does not divide over mesh axes {axes} "
                                 f"(size {km.size(axes)}); change " + " or ".join(f"mesh.{a}" for a in axes))
    spec_of = {"batch": km.batch or None, "heads": km.heads or None}
    to_spec = lambda layout: P(*(spec_of.get(n) for n in layout))

    def body(*shards):
        full = list(args)
        for i, shard in zip(present, shards, strict=True):
            full[i] = shard
        return fn(*full)

    several = bool(out_layout) and isinstance(out_layout[0], tuple)
    out_specs = tuple(map(to_spec, out_layout)) if several else to_spec(out_layout)
    mapped = _shard_map(body, km.mesh, tuple(to_spec(layouts[i]) for i in present), out_specs)
    return mapped(*(args[i] for i in present))
