"""Dispatch of an op to its implementations: the scheme every op of this package follows.

An op has a reference (pure jnp, every backend, the oracle its kernels are tested against) and kernels.
`impl="auto"` tries the backend's kernels in order, then the reference; a named impl is tried, then the
reference. A kernel that cannot take a call raises `Unsupported(reason)`: the op logs the reason and
goes on to the next candidate, so a call never returns a wrong answer and never falls back silently.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence

import jax

from pallas_kernels import per_shard

log = logging.getLogger(__name__)


class Unsupported(NotImplementedError):
    """Raised by a kernel for inputs it cannot take; the message says why."""


def require_gpu(name: str, interpret: bool = False) -> None:
    """Raises Unsupported unless the default backend is a GPU (or the kernel runs under the interpreter)."""
    if not interpret and jax.default_backend() != "gpu":
        raise Unsupported(f"{name} needs a CUDA GPU (backend is {jax.default_backend()})")


@dataclasses.dataclass(frozen=True)
class KernelOp:
    """name: what the op is called in messages; impls: {name: fn} with "reference" among them; auto_order:
    per backend, the kernels `impl="auto"` tries before the reference; reference_per_shard: False for a
    reference that XLA partitions better than a per-shard call would (a reduction over an axis the
    tensor axis may split)."""

    name: str
    impls: dict[str, Callable]
    auto_order: dict[str, tuple[str, ...]]
    reference_per_shard: bool = True

    def candidates(self, impl: str) -> list[str]:
        if impl != "auto" and impl not in self.impls:
            raise ValueError(f"unknown {self.name} impl {impl!r}; choose one of {', '.join(['auto', *self.impls])}")
        names = list(self.auto_order.get(jax.default_backend(), ())) if impl == "auto" else [impl]
        return names if names and names[-1] == "reference" else [*names, "reference"]

    def choose(self, impl: str, *args, **kwargs) -> tuple[str, list[str]]:
        """The implementation a call with these (abstract) operands takes: (name, why each earlier
        candidate was skipped), found by tracing each candidate without running it."""
        skipped = []
        for name in self.candidates(impl):
            try:
                jax.eval_shape(functools.partial(self.impls[name], **kwargs), *args)
                return name, skipped
            except Unsupported as why:
                skipped.append(f"{name}: {why}")
        raise AssertionError("unreachable: the reference takes every call")

    def __call__(self, impl: str, args: Sequence, layouts: Sequence[per_shard.Layout], out_layout: per_shard.Layout,
                 kernel_mesh: per_shard.KernelMesh | None = None, **kwargs):
        """The first candidate that takes fn(*args, **kwargs), per shard under a kernel mesh."""
        for name in self.candidates(impl):
            try:
                fn = functools.partial(self.impls[name], **kwargs)
                mesh = kernel_mesh if name != "reference" or self.reference_per_shard else None
                return per_shard.run(fn, args, layouts, out_layout, mesh)
            except Unsupported as why:
                log.warning("%s impl %r skipped: %s; falling back", self.name, name, why)
        raise AssertionError("unreachable: the reference takes every call")
