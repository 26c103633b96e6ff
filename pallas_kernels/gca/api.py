"""The GCA dispatcher: the only place that knows which implementations exist.

An implementation is a callable with the signature of `gca_reference`. Backend modules are imported
lazily, so importing this package works on a machine without a GPU, a TPU or jax-triton. A kernel
that cannot take a call raises `Unsupported(reason)`; the dispatcher then logs the reason and falls
back to the next candidate, never returning a wrong answer.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable

import jax

from pallas_kernels import per_shard
from pallas_kernels.dispatch import Unsupported  # noqa: F401 - the GCA kernels raise it from here

log = logging.getLogger(__name__)




# name -> (module, attribute); the reference is always available.
_REGISTRY: dict[str, tuple[str, str]] = {
    "reference": ("pallas_kernels.gca.reference", "gca_reference"),
    "pallas_gpu": ("pallas_kernels.gca.pallas_gpu", "gca_pallas_gpu"),
    "pallas_tpu": ("pallas_kernels.gca.pallas_tpu", "gca_pallas_tpu"),
    "triton": ("pallas_kernels.gca.triton_gpu", "gca_triton"),
}

# Per backend, the order `impl="auto"` tries. Kernel modules extend these lists as they land.
# GPU/TPU orders are set from the H100 measurements in docs/results.md ("## GCA kernels").
# H100, 64K tokens, batch 1, bf16, K=8 (docs/results.md, "## GCA kernels"): fwd+bwd pallas_gpu 1.9 ms,
# triton 4.8 ms, XLA reference 25 ms. TPU: pallas_tpu (interpret-tested and Mosaic-lowered on CPU only).
AUTO_ORDER: dict[str, list[str]] = {
    "cpu": ["reference"],
    "gpu": ["pallas_gpu", "triton", "reference"],
    "tpu": ["pallas_tpu", "reference"],
}


def register(name: str, module: str, attribute: str) -> None:
    _REGISTRY[name] = (module, attribute)


def available_impls() -> list[str]:
    return list(_REGISTRY)


def _resolve(name: str) -> Callable:
    if name not in _REGISTRY:
        raise ValueError(f"unknown GCA impl {name!r}; choose one of {['auto', *_REGISTRY]}")
    module, attribute = _REGISTRY[name]
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError as err:
        raise Unsupported(f"{name} cannot be imported here ({err})") from err


# Dimension names of q, k_mem, v_mem, indices, weights for per-shard execution.
_Q = ("batch", None, None, "heads", None)
_LAYOUTS = (_Q, _Q, _Q, ("batch", None, None), ("batch", None, None))


def _check_shapes(q, k_mem, v_mem, indices, weights) -> None:
    if q.ndim != 5 or k_mem.ndim != 5:
        raise ValueError(
            f"GCA wants q [B,C,Sq,H,D] and k_mem [B,M,Sm,Hkv,D]; got q{q.shape} k_mem{k_mem.shape}"
        )
    B, C, _, H, D = q.shape
    if k_mem.shape != v_mem.shape:
        raise ValueError(f"GCA k_mem{k_mem.shape} and v_mem{v_mem.shape} must have the same shape")
    if k_mem.shape[0] != B or k_mem.shape[4] != D:
        raise ValueError(f"GCA k_mem{k_mem.shape} does not match q{q.shape} in batch or head dim")
    if H % k_mem.shape[3]:
        raise ValueError(f"GCA query heads {H} are not a multiple of key/value heads {k_mem.shape[3]}")
    if indices.shape != weights.shape or indices.shape[:2] != (B, C) or indices.ndim != 3:
        raise ValueError(
            f"GCA indices{indices.shape} and weights{weights.shape} must both be [B={B}, C={C}, K]"
        )
    if not jax.numpy.issubdtype(indices.dtype, jax.numpy.integer):
        raise ValueError(f"GCA indices must be integers, got {indices.dtype}")


def _candidates(impl: str) -> list[str]:
    """The implementations `impl` tries, in order; the reference last, as it takes every call."""
    candidates = AUTO_ORDER.get(jax.default_backend(), ["reference"]) if impl == "auto" else [impl]
    return candidates if candidates[-1] == "reference" else [*candidates, "reference"]


def choose(q, k_mem, v_mem, indices, weights, *, impl: str = "auto", softmax_off_by_one: bool = True) -> tuple[str, list[str]]:
    """The implementation a call with these (abstract or concrete) operands takes, by tracing each
    candidate in dispatch order without running it: (name, why each earlier candidate was skipped)."""
    _check_shapes(q, k_mem, v_mem, indices, weights)
    skipped = []
    for name in _candidates(impl):
        try:
            kernel = functools.partial(_resolve(name), softmax_off_by_one=softmax_off_by_one)
            jax.eval_shape(kernel, q, k_mem, v_mem, indices, weights)
            return name, skipped
        except Unsupported as why:
            skipped.append(f"{name}: {why}")
    raise AssertionError("unreachable: the reference takes every call")


def grouped_cross_attention(
    q, k_mem, v_mem, indices, weights, *, softmax_off_by_one: bool = True, scale: float | None = None,
    impl: str = "auto", kernel_mesh: per_shard.KernelMesh | None = None,
):
    """Grouped Cross-Attention; see `pallas_kernels.gca.reference` for shapes and maths.

    impl: "auto" (the best available for the default backend), or one of `available_impls()`.
    Differentiable in q, k_mem, v_mem and weights. With a `kernel_mesh` (pallas_kernels.per_shard) the
    kernel runs per shard: batch rows over the batch axes, query and key/value heads over the head axes.
    """
    _check_shapes(q, k_mem, v_mem, indices, weights)
    for name in _candidates(impl):
        try:
            kernel = functools.partial(_resolve(name), softmax_off_by_one=softmax_off_by_one, scale=scale)
            return per_shard.run(kernel, (q, k_mem, v_mem, indices, weights), _LAYOUTS, _Q, kernel_mesh)
        except Unsupported as why:
            log.warning("GCA impl %r skipped: %s; falling back", name, why)
    raise AssertionError("unreachable: the reference takes every call")
