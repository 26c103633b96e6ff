"""GCA as Pallas Mosaic TPU kernels: the retrieved chunk ids are scalar-prefetched into SMEM and read
in the BlockSpec index_maps, so the pipeline DMAs exactly the retrieved [Sm, D] chunk per grid step
(no gathered copy). Layout: heads are moved outside the (Sq, D) / (Sm, D) tiles with a transpose,
q -> [B, Hkv, C, G*Sq, D] (the G query heads sharing a kv head stacked along rows), k/v ->
[B, Hkv, M, Sm, D]; every block's last two dims are then the full array dims, which Mosaic's (8, 128)
rule always accepts.

  forward  grid (B, Hkv, C, K)  K innermost ("arbitrary"): acc[c] += w_j softmax(q k_j^T) v_j in VMEM.
  dq / dw  grid (B, Hkv, C, K)  recomputes P_j, dq[c] += w_j scale dS_j k_j, dw[c, j] = sum D_j.
  dk / dv  grid (B, Hkv, P)     P = C*K + M entries of the inverse index (all (query chunk, slot) pairs
                                sorted by the memory chunk they chose, plus one empty entry per memory
                                chunk so that every dk/dv block is written); consecutive entries of a
                                chunk revisit its output block, accumulated in VMEM scratch.
The transposed-softmax form (s^T = k q^T, softmax over rows) in dk/dv keeps every matmul an A @ B or
A @ B^T. Test on CPU with `interpret=pltpu.InterpretParams(...)`; the tests also lower it for TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gca import common_vjp
from pallas_kernels.gca.api import Unsupported


def _dot(a, b, trans_b=False):
    dims = (((1,), ((1 if trans_b else 0),)), ((), ()))
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _softmax(s, obo, axis):
    """Softmax of fp32 logits over the keys' axis (1 for [GSq, Sm], 0 for the transposed [Sm, GSq]),
    off-by-one optional."""
    m = jnp.max(s, axis=axis, keepdims=True)
    if obo:
        m = jnp.maximum(m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=axis, keepdims=True)
    if obo:
        denom = denom + jnp.exp(-m)
    return p / denom


def _fwd_kernel(idx_ref, w_ref, q_ref, k_ref, v_ref, o_ref, acc_ref, *, C, K, scale, obo):
    b, c, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    flat = (b * C + c) * K + j

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(idx_ref[flat] >= 0)
    def _():
        v = v_ref[...]
        p = _softmax(_dot(q_ref[...], k_ref[...], trans_b=True) * scale, obo, axis=1)
        acc_ref[...] += w_ref[flat] * _dot(p.astype(v.dtype), v)

    @pl.when(j == K - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _dq_kernel(idx_ref, w_ref, q_ref, k_ref, v_ref, do_ref, dq_ref, dw_ref, dq_acc, *, C, K, scale, obo):
    b, c, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    flat = (b * C + c) * K + j
    slot = jax.lax.broadcasted_iota(jnp.int32, dw_ref.shape, 1)

    @pl.when(j == 0)
    def _():
        dq_acc[...] = jnp.zeros_like(dq_acc)
        dw_ref[...] = jnp.zeros_like(dw_ref)

    @pl.when(idx_ref[flat] >= 0)
    def _():
        k, v, do = k_ref[...], v_ref[...], do_ref[...]
        p = _softmax(_dot(q_ref[...], k, trans_b=True) * scale, obo, axis=1)
        dp = _dot(do, v, trans_b=True)
        dd = jnp.sum(p * dp, axis=1, keepdims=True)  # D_j = <dO, O_j> per row
        ds = p * (dp - dd)
        dq_acc[...] += w_ref[flat] * _dot(ds.astype(k.dtype), k)
        total = jnp.sum(dd, axis=0, keepdims=True)  # [1, 1]
        dw_ref[...] = jnp.where(slot == j, total, dw_ref[...])

    @pl.when(j == K - 1)
    def _():
        dq_ref[...] = (dq_acc[...] * scale).astype(dq_ref.dtype)


def _dkdv_kernel(pm_ref, pe_ref, pc_ref, w_ref, q_ref, do_ref, k_ref, v_ref, dk_ref, dv_ref, dk_acc, dv_acc,
                 *, P, CK, scale, obo):
    b, n = pl.program_id(0), pl.program_id(2)
    base = b * P
    m = pm_ref[base + n]
    first = jnp.logical_or(n == 0, pm_ref[base + jnp.maximum(n - 1, 0)] != m)
    last = jnp.logical_or(n == P - 1, pm_ref[base + jnp.minimum(n + 1, P - 1)] != m)
    e = pe_ref[base + n]

    @pl.when(first)
    def _():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    @pl.when(e >= 0)
    def _():
        w = w_ref[b * CK + jnp.maximum(e, 0)]
        q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
        pT = _softmax(_dot(k, q, trans_b=True) * scale, obo, axis=0)  # [Sm, GSq]
        dv_acc[...] += w * _dot(pT.astype(do.dtype), do)
        dpT = _dot(v, do, trans_b=True)
        dd = jnp.sum(pT * dpT, axis=0, keepdims=True)
        dsT = pT * (dpT - dd)
        dk_acc[...] += w * _dot(dsT.astype(q.dtype), q)

    @pl.when(last)
    def _():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _to_tiles(q, Hkv):
    B, C, Sq, H, D = q.shape
    G = H // Hkv
    return q.reshape(B, C, Sq, Hkv, G, D).transpose(0, 3, 1, 4, 2, 5).reshape(B, Hkv, C, G * Sq, D)


def _from_tiles(x, Sq, H):
    B, Hkv, C, GSq, D = x.shape
    G = H // Hkv
    return x.reshape(B, Hkv, C, G, Sq, D).transpose(0, 2, 4, 1, 3, 5).reshape(B, C, Sq, H, D)


def _mem_tiles(k):
    return k.transpose(0, 3, 1, 2, 4)  # [B, Hkv, M, Sm, D]


def _mem_from_tiles(k):
    return k.transpose(0, 2, 3, 1, 4)


def _params(interpret, sem):
    return dict(
        interpret=interpret if interpret else False,
        compiler_params=pltpu.CompilerParams(dimension_semantics=sem),
    )


def _forward(q, k_mem, v_mem, indices, weights, obo, scale, interpret):
    B, C, Sq, H, D = q.shape
    _, M, Sm, Hkv, _ = k_mem.shape
    K = indices.shape[2]
    GSq = (H // Hkv) * Sq
    qt, kt, vt = _to_tiles(q, Hkv), _mem_tiles(k_mem), _mem_tiles(v_mem)
    qspec = pl.BlockSpec((None, None, None, GSq, D), lambda b, h, c, j, idx, w: (b, h, c, 0, 0))
    mspec = pl.BlockSpec(
        (None, None, None, Sm, D), lambda b, h, c, j, idx, w: (b, h, jnp.maximum(idx[(b * C + c) * K + j], 0), 0, 0)
    )
    gs = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(B, Hkv, C, K), in_specs=[qspec, mspec, mspec], out_specs=qspec,
        scratch_shapes=[pltpu.VMEM((GSq, D), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, C=C, K=K, scale=scale, obo=obo),
        grid_spec=gs, out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype), name="gca_fwd_pallas_tpu",
        **_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
    )(indices.reshape(-1), weights.reshape(-1).astype(jnp.float32), qt, kt, vt)
    return _from_tiles(out, Sq, H)


def _inverse_entries(indices, M):
    """Entries (memory chunk, pair code c*K+j or -1, query chunk to DMA) sorted by memory chunk: every
    (query chunk, slot) pair plus one empty entry per memory chunk; empty slots become empty entries."""
    B, C, K = indices.shape
    CK = C * K
    valid = (indices >= 0).reshape(B, CK)
    codes = jnp.concatenate(
        [jnp.where(valid, jnp.arange(CK, dtype=jnp.int32), -1), jnp.full((B, M), -1, jnp.int32)], axis=1
    )
    keys = jnp.concatenate(
        [jnp.where(valid, indices.reshape(B, CK), 0), jnp.broadcast_to(jnp.arange(M, dtype=jnp.int32), (B, M))],
        axis=1,
    ).astype(jnp.int32)
    order = jnp.argsort(keys, axis=1, stable=True)
    pm = jnp.take_along_axis(keys, order, axis=1)
    pe = jnp.take_along_axis(codes, order, axis=1)
    # Query chunk whose q/dO tiles the pipeline fetches: for an empty entry, repeat the previous real
    # entry's chunk so that no extra DMA is issued.
    pos = jnp.where(pe >= 0, jnp.arange(CK + M, dtype=jnp.int32), -1)
    last_real = jax.lax.cummax(pos, axis=1)
    pc = jnp.where(last_real >= 0, jnp.take_along_axis(jnp.maximum(pe, 0), jnp.maximum(last_real, 0), axis=1) // K, 0)
    return pm.astype(jnp.int32), pe.astype(jnp.int32), pc.astype(jnp.int32)


def _backward(q, k_mem, v_mem, indices, weights, do, obo, scale, interpret):
    B, C, Sq, H, D = q.shape
    _, M, Sm, Hkv, _ = k_mem.shape
    K = indices.shape[2]
    GSq = (H // Hkv) * Sq
    qt, dot_, kt, vt = _to_tiles(q, Hkv), _to_tiles(do, Hkv), _mem_tiles(k_mem), _mem_tiles(v_mem)
    wf = weights.reshape(-1).astype(jnp.float32)

    qspec = pl.BlockSpec((None, None, None, GSq, D), lambda b, h, c, j, idx, w: (b, h, c, 0, 0))
    mspec = pl.BlockSpec(
        (None, None, None, Sm, D), lambda b, h, c, j, idx, w: (b, h, jnp.maximum(idx[(b * C + c) * K + j], 0), 0, 0)
    )
    dwspec = pl.BlockSpec((None, None, None, 1, K), lambda b, h, c, j, idx, w: (b, h, c, 0, 0))
    gs = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(B, Hkv, C, K), in_specs=[qspec, mspec, mspec, qspec],
        out_specs=[qspec, dwspec], scratch_shapes=[pltpu.VMEM((GSq, D), jnp.float32)],
    )
    dqt, dw = pl.pallas_call(
        functools.partial(_dq_kernel, C=C, K=K, scale=scale, obo=obo),
        grid_spec=gs,
        out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype), jax.ShapeDtypeStruct((B, Hkv, C, 1, K), jnp.float32)],
        name="gca_bwd_dq_pallas_tpu", **_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
    )(indices.reshape(-1), wf, qt, kt, vt, dot_)

    pm, pe, pc = _inverse_entries(indices, M)
    P = C * K + M
    cspec = pl.BlockSpec((None, None, None, GSq, D), lambda b, h, n, pm, pe, pc, w: (b, h, pc[b * P + n], 0, 0))
    mspec2 = pl.BlockSpec((None, None, None, Sm, D), lambda b, h, n, pm, pe, pc, w: (b, h, pm[b * P + n], 0, 0))
    gs2 = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(B, Hkv, P), in_specs=[cspec, cspec, mspec2, mspec2],
        out_specs=[mspec2, mspec2], scratch_shapes=[pltpu.VMEM((Sm, D), jnp.float32)] * 2,
    )
    dkt, dvt = pl.pallas_call(
        functools.partial(_dkdv_kernel, P=P, CK=C * K, scale=scale, obo=obo),
        grid_spec=gs2,
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k_mem.dtype), jax.ShapeDtypeStruct(vt.shape, v_mem.dtype)],
        name="gca_bwd_dkdv_pallas_tpu", **_params(interpret, ("parallel", "parallel", "arbitrary")),
    )(pm.reshape(-1), pe.reshape(-1), pc.reshape(-1), wf, qt, dot_, kt, vt)

    dw = jnp.where(indices >= 0, jnp.sum(dw[:, :, :, 0, :], axis=1), 0.0).astype(weights.dtype)
    return _from_tiles(dqt, Sq, H), _mem_from_tiles(dkt), _mem_from_tiles(dvt), dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _gca(q, k_mem, v_mem, indices, weights, obo, scale, interpret):
    return _forward(q, k_mem, v_mem, indices, weights, obo, scale, interpret)


def _gca_fwd(q, k_mem, v_mem, indices, weights, obo, scale, interpret):
    return _forward(q, k_mem, v_mem, indices, weights, obo, scale, interpret), (q, k_mem, v_mem, indices, weights)


def _gca_bwd(obo, scale, interpret, res, do):
    q, k_mem, v_mem, indices, weights = res
    dq, dk, dv, dw = _backward(q, k_mem, v_mem, indices, weights, do.astype(q.dtype), obo, scale, interpret)
    return dq, dk, dv, None, dw


_gca.defvjp(_gca_fwd, _gca_bwd)


def gca_pallas_tpu(q, k_mem, v_mem, indices, weights, *, softmax_off_by_one=True, scale=None, interpret=None,
                   _force_lowering=False):
    """Same contract as `gca_reference`. interpret: None (real TPU) or a `pltpu.InterpretParams`/True.
    `_force_lowering` skips the backend check so tests can lower it for TPU on a CPU host."""
    if interpret is None and not _force_lowering and jax.default_backend() != "tpu":
        raise Unsupported(f"pallas_tpu needs a TPU (backend is {jax.default_backend()})")
    common_vjp.check_dtypes(q, k_mem, v_mem, weights)
    D = q.shape[-1]
    Sq, Sm, H, Hkv = q.shape[2], k_mem.shape[2], q.shape[3], k_mem.shape[3]
    if (H // Hkv) * Sq > 1024 or Sm > 1024 or D > 256:
        raise Unsupported(f"pallas_tpu keeps a chunk in one VMEM tile: G*Sq={(H // Hkv) * Sq}, Sm={Sm}, D={D}")
    scale = common_vjp.resolve_scale(scale, D)
    if isinstance(interpret, bool):
        interpret = interpret or None
    return _gca(q, k_mem, v_mem, indices.astype(jnp.int32), weights, bool(softmax_off_by_one), scale, interpret)
