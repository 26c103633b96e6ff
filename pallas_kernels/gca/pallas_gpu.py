"""GCA as Pallas kernels for NVIDIA GPUs, lowered through Triton (explicit `pltriton.CompilerParams`).

Three launches, no gathered K/V copy anywhere (see `common_vjp` for the backward organisation):
  forward   grid (B, C, H):   q tile [Sq, D] in registers, loop over the K slots; each slot loads its
                              memory chunk [Sm, D] straight from k_mem/v_mem by index, softmax over
                              the chunk (off-by-one optional), acc += w_j P_j V_j in fp32.
  dq / dw   grid (B, C, H):   same loop, recomputes P_j, writes dq and per-head dweights partials.
  dk / dv   grid (B, M, Hkv): loop over the (query chunk, slot) pairs that retrieved chunk m (sorted
                              pair list), all GQA heads of the kv head, writes dk_mem/dv_mem once.
Refs are whole arrays (pointer arithmetic in Triton); tiles are padded to powers of two and masked,
so Sq, Sm need not be powers of two. `interpret=True` runs the generic Pallas interpreter (CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import poison
from pallas_kernels.blocks import next_pow2
from pallas_kernels.dispatch import require_gpu
from pallas_kernels.gca import common_vjp

NUM_WARPS = 4
NUM_STAGES = 2


def _dot(a, b, trans_a=False, trans_b=False):
    """fp32-accumulated 2D matmul; IEEE fp32 for fp32 operands (no tf32), bf16 MMA for bf16."""
    dims = (((0 if trans_a else 1),), ((1 if trans_b else 0),)), ((), ())
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _softmax(q, k, cmask, scale, obo):
    """Normalised chunk softmax P [SqP, SmP] (fp32) of scale * q k^T, padded key columns masked."""
    s = _dot(q, k, trans_b=True) * scale
    if cmask is not None:
        s = jnp.where(cmask[None, :], s, -jnp.inf)
    m = jnp.max(s, axis=1)
    if obo:
        m = jnp.maximum(m, 0.0)
    p = jnp.exp(s - m[:, None])
    denom = jnp.sum(p, axis=1)
    if obo:
        denom = denom + jnp.exp(-m)
    return p / denom[:, None]


def _load_rows(ref, rmask):
    if rmask is None:
        return ref[...]
    return pltriton.load(ref, mask=rmask[:, None], other=0.0)


def _store_rows(ref, val, rmask):
    if rmask is None:
        ref[...] = val
    else:
        pltriton.store(ref, val, mask=rmask[:, None])


def _fwd_kernel(idx_ref, w_ref, q_ref, k_ref, v_ref, o_ref, *, K, Sq, Sm, SqP, SmP, G, scale, obo):
    b, c, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    hk = h // G
    rmask = jnp.arange(SqP) < Sq if SqP != Sq else None
    cmask = jnp.arange(SmP) < Sm if SmP != Sm else None
    q = _load_rows(q_ref.at[b, c, pl.ds(0, SqP), h, :], rmask)

    def body(j, acc):
        i = idx_ref[b, c, j]
        w = jnp.where(i >= 0, w_ref[b, c, j].astype(jnp.float32), 0.0)
        i = jnp.maximum(i, 0)
        k = _load_rows(k_ref.at[b, i, pl.ds(0, SmP), hk, :], cmask)
        v = _load_rows(v_ref.at[b, i, pl.ds(0, SmP), hk, :], cmask)
        p = _softmax(q, k, cmask, scale, obo)
        return acc + w * _dot(p.astype(v.dtype), v)

    acc = jax.lax.fori_loop(0, K, body, jnp.zeros((SqP, q.shape[-1]), jnp.float32))
    _store_rows(o_ref.at[b, c, pl.ds(0, SqP), h, :], acc.astype(o_ref.dtype), rmask)


def _dq_kernel(idx_ref, w_ref, q_ref, k_ref, v_ref, do_ref, dq_ref, dw_ref, *, K, KP, Sq, Sm, SqP, SmP,
               G, scale, obo):
    b, c, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    hk = h // G
    rmask = jnp.arange(SqP) < Sq if SqP != Sq else None
    cmask = jnp.arange(SmP) < Sm if SmP != Sm else None
    q = _load_rows(q_ref.at[b, c, pl.ds(0, SqP), h, :], rmask)
    do = _load_rows(do_ref.at[b, c, pl.ds(0, SqP), h, :], rmask)
    slots = jnp.arange(KP)

    def body(j, carry):
        dq, dw = carry
        i = idx_ref[b, c, j]
        valid = i >= 0
        w = jnp.where(valid, w_ref[b, c, j].astype(jnp.float32), 0.0)
        i = jnp.maximum(i, 0)
        k = _load_rows(k_ref.at[b, i, pl.ds(0, SmP), hk, :], cmask)
        v = _load_rows(v_ref.at[b, i, pl.ds(0, SmP), hk, :], cmask)
        p = _softmax(q, k, cmask, scale, obo)
        dp = _dot(do, v, trans_b=True)
        dd = jnp.sum(p * dp, axis=1)  # D_j = <dO, O_j> per query row
        ds = p * (dp - dd[:, None])
        dq = dq + w * _dot(ds.astype(k.dtype), k)
        dw = jnp.where(slots == j, jnp.where(valid, jnp.sum(dd), 0.0), dw)
        return dq, dw

    dq, dw = jax.lax.fori_loop(
        0, K, body, (jnp.zeros((SqP, q.shape[-1]), jnp.float32), jnp.zeros((KP,), jnp.float32))
    )
    _store_rows(dq_ref.at[b, c, pl.ds(0, SqP), h, :], (dq * scale).astype(dq_ref.dtype), rmask)
    if KP == K:
        dw_ref[b, c, h, :] = dw
    else:
        pltriton.store(dw_ref.at[b, c, h, pl.ds(0, KP)], dw, mask=slots < K)


def _dkdv_kernel(pairs_ref, starts_ref, w_ref, q_ref, k_ref, v_ref, do_ref, dk_ref, dv_ref, *, K, Sq, Sm,
                 SqP, SmP, G, scale, obo):
    b, m, hk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rmask = jnp.arange(SqP) < Sq if SqP != Sq else None
    cmask = jnp.arange(SmP) < Sm if SmP != Sm else None
    k = _load_rows(k_ref.at[b, m, pl.ds(0, SmP), hk, :], cmask)
    v = _load_rows(v_ref.at[b, m, pl.ds(0, SmP), hk, :], cmask)
    start = starts_ref[b, m]
    end = starts_ref[b, m + 1]
    D = k.shape[-1]

    def body(n, carry):
        dk, dv = carry
        e = pairs_ref[b, n]
        c = e // K
        w = w_ref[b, e].astype(jnp.float32)
        for g in range(G):
            h = hk * G + g
            q = _load_rows(q_ref.at[b, c, pl.ds(0, SqP), h, :], rmask)
            do = _load_rows(do_ref.at[b, c, pl.ds(0, SqP), h, :], rmask)
            p = _softmax(q, k, cmask, scale, obo)
            if rmask is not None:
                p = jnp.where(rmask[:, None], p, 0.0)
            dv = dv + w * _dot(p.astype(do.dtype), do, trans_a=True)
            dp = _dot(do, v, trans_b=True)
            dd = jnp.sum(p * dp, axis=1)
            ds = p * (dp - dd[:, None])
            dk = dk + w * _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    z = jnp.zeros((SmP, D), jnp.float32)
    dk, dv = jax.lax.fori_loop(start, end, body, (z, z))
    _store_rows(dk_ref.at[b, m, pl.ds(0, SmP), hk, :], (dk * scale).astype(dk_ref.dtype), cmask)
    _store_rows(dv_ref.at[b, m, pl.ds(0, SmP), hk, :], dv.astype(dv_ref.dtype), cmask)


def _call(kernel, grid, out_shapes, args, *, interpret, name):
    """pallas_call over whole-array refs, outputs poisoned under tests (pallas_kernels.poison)."""
    return poison.pallas_call(kernel, out_shapes=out_shapes, grid=grid, args=args, interpret=interpret, name=name,
                              compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES))


def _static(q, k_mem, indices):
    B, C, Sq, H, D = q.shape
    _, M, Sm, Hkv, _ = k_mem.shape
    K = indices.shape[2]
    return dict(B=B, C=C, Sq=Sq, H=H, D=D, M=M, Sm=Sm, Hkv=Hkv, K=K, G=H // Hkv,
                SqP=max(16, next_pow2(Sq)), SmP=max(16, next_pow2(Sm)))


def _forward(q, k_mem, v_mem, indices, weights, obo, scale, interpret):
    s = _static(q, k_mem, indices)
    kern = functools.partial(_fwd_kernel, K=s["K"], Sq=s["Sq"], Sm=s["Sm"], SqP=s["SqP"], SmP=s["SmP"],
                             G=s["G"], scale=scale, obo=obo)
    (out,) = _call(kern, (s["B"], s["C"], s["H"]), [jax.ShapeDtypeStruct(q.shape, q.dtype)],
                   (indices, weights, q, k_mem, v_mem), interpret=interpret, name="gca_fwd_pallas_gpu")
    return out


def _backward(q, k_mem, v_mem, indices, weights, do, obo, scale, interpret):
    s = _static(q, k_mem, indices)
    B, C, H, M, Hkv, K = s["B"], s["C"], s["H"], s["M"], s["Hkv"], s["K"]
    KP = next_pow2(K)
    common = dict(K=K, Sq=s["Sq"], Sm=s["Sm"], SqP=s["SqP"], SmP=s["SmP"], G=s["G"], scale=scale, obo=obo)
    dq, dw = _call(
        functools.partial(_dq_kernel, KP=KP, **common), (B, C, H),
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, C, H, K), jnp.float32)],
        (indices, weights, q, k_mem, v_mem, do), interpret=interpret, name="gca_bwd_dq_pallas_gpu",
    )
    pairs, starts = common_vjp.inverse_index(indices, M)
    dk, dv = _call(
        functools.partial(_dkdv_kernel, **common), (B, M, Hkv),
        [jax.ShapeDtypeStruct(k_mem.shape, k_mem.dtype), jax.ShapeDtypeStruct(v_mem.shape, v_mem.dtype)],
        (pairs, starts, weights.reshape(B, C * K), q, k_mem, v_mem, do), interpret=interpret,
        name="gca_bwd_dkdv_pallas_gpu",
    )
    dw = jnp.where(indices >= 0, jnp.sum(dw, axis=2), 0.0).astype(weights.dtype)
    return dq, dk, dv, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _gca(q, k_mem, v_mem, indices, weights, obo, scale, interpret):
    return _forward(q, k_mem, v_mem, indices, weights, obo, scale, interpret)


def _gca_fwd(q, k_mem, v_mem, indices, weights, obo, scale, interpret):
    out = _forward(q, k_mem, v_mem, indices, weights, obo, scale, interpret)
    return out, (q, k_mem, v_mem, indices, weights)


def _gca_bwd(obo, scale, interpret, res, do):
    q, k_mem, v_mem, indices, weights = res
    dq, dk, dv, dw = _backward(q, k_mem, v_mem, indices, weights, do.astype(q.dtype), obo, scale, interpret)
    return dq, dk, dv, None, dw


_gca.defvjp(_gca_fwd, _gca_bwd)


def gca_pallas_gpu(q, k_mem, v_mem, indices, weights, *, softmax_off_by_one=True, scale=None,
                   interpret=False):
    """Same contract as `gca_reference`; raises `Unsupported` for inputs this kernel cannot take."""
    require_gpu("pallas_gpu", interpret)
    common_vjp.check_dtypes(q, k_mem, v_mem, weights)
    common_vjp.check_one_tile("pallas_gpu", q, k_mem)
    scale = common_vjp.resolve_scale(scale, q.shape[-1])
    return _gca(q, k_mem, v_mem, indices.astype(jnp.int32), weights, bool(softmax_off_by_one), scale,
                bool(interpret))


def gca_pallas_gpu_interpret(q, k_mem, v_mem, indices, weights, **kw):
    """The same kernels under the generic Pallas interpreter (for CPU tests and the dispatcher test)."""
    return gca_pallas_gpu(q, k_mem, v_mem, indices, weights, interpret=True, **kw)
