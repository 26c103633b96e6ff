"""Pieces shared by the GCA kernels (pallas_gpu, pallas_tpu, triton): argument checks and the inverse
index for the backward pass (the output poisoning used by the tests is pallas_kernels.poison).

Backward organisation (all three kernels):
  * dq / dweights: a grid over query chunks (like the forward); each program loops over its K slots,
    recomputes the chunk softmax P_j (the whole softmax of one (query chunk, slot) lives in one
    Sm-wide tile, so no log-sum-exp has to be saved), dP_j = dO V_j^T, D_j = rowsum(P_j * dP_j)
    (= <dO, O_j>), dS_j = P_j (dP_j - D_j), dq += w_j scale dS_j K_j, dweights[c, j] = sum D_j.
  * dk / dv: a grid over memory chunks; each program walks the (query chunk, slot) pairs that
    retrieved its chunk (`inverse_index`: a sorted pair list plus per-chunk segment offsets, built
    with an argsort in JAX) and accumulates dV += w P^T dO, dK += w scale dS^T Q in registers /
    VMEM, writing its [Sm, Hkv, D] slice of dk_mem/dv_mem once. Deterministic, no atomics, and
    never a [B, C, K, Sm, H, D] gathered tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.blocks import next_pow2
from pallas_kernels.gca.api import Unsupported


def check_dtypes(q, k_mem, v_mem, weights) -> None:
    ok = (jnp.float32, jnp.bfloat16)
    for name, x in (("q", q), ("k_mem", k_mem), ("v_mem", v_mem)):
        if x.dtype not in ok:
            raise Unsupported(f"{name} dtype {x.dtype} (kernels take float32 or bfloat16)")
    if not (q.dtype == k_mem.dtype == v_mem.dtype):
        raise Unsupported(f"mixed dtypes q {q.dtype}, k {k_mem.dtype}, v {v_mem.dtype}")
    if not jnp.issubdtype(weights.dtype, jnp.floating):
        raise Unsupported(f"weights dtype {weights.dtype}")


def check_one_tile(name: str, q, k_mem) -> None:
    """The GPU kernels keep a whole chunk (queries and memory) in one tile of a supported head dim."""
    D = q.shape[-1]
    if D not in (16, 32, 64, 128):
        raise Unsupported(f"{name} takes head dim 16/32/64/128, got {D}")
    Sq, Sm = q.shape[2], k_mem.shape[2]
    if max(16, next_pow2(Sq)) > 128 or max(16, next_pow2(Sm)) > 128:
        raise Unsupported(f"{name} keeps a whole chunk in one tile: Sq={Sq}, Sm={Sm} must be <= 128")


def inverse_index(indices, M: int):
    """For each batch row: the (query chunk, slot) pairs sorted by the memory chunk they chose.

    Returns (pairs [B, C*K] int32 with pair = c*K + j, starts [B, M+1] int32): the pairs that
    retrieved memory chunk m are pairs[b, starts[b, m]:starts[b, m+1]]; empty slots (-1) are sorted
    past starts[b, M] and never visited. Stable sort, so the accumulation order is fixed.
    """
    B, C, K = indices.shape
    key = jnp.where(indices >= 0, indices, M).reshape(B, C * K).astype(jnp.int32)
    order = jnp.argsort(key, axis=1, stable=True).astype(jnp.int32)
    sorted_key = jnp.take_along_axis(key, order, axis=1)
    starts = jax.vmap(lambda s: jnp.searchsorted(s, jnp.arange(M + 1, dtype=jnp.int32), side="left"))(
        sorted_key
    ).astype(jnp.int32)
    return order, starts


def resolve_scale(scale, D):
    return float(D**-0.5 if scale is None else scale)
