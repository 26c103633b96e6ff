"""GCA as hand-written Triton kernels called through jax_triton.triton_call (jax-triton 0.3.1 API).

Same organisation as `pallas_gpu` (see `common_vjp`): forward and dq/dw over a (B*C, H) grid that
loops over the K slots and reads each retrieved chunk straight out of k_mem/v_mem by index; dk/dv
over a (B*M, Hkv) grid that walks the sorted (query chunk, slot) pairs of its memory chunk and
writes its slice once (deterministic, no atomics, no gathered copy). A chunk's whole softmax is one
[SQP, SMP] tile, so nothing but the inputs is saved for the backward pass.

Importing this module never fails: without triton / jax_triton / a GPU, calls raise `Unsupported`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import poison
from pallas_kernels.blocks import next_pow2
from pallas_kernels.gca import common_vjp
from pallas_kernels.gca.api import Unsupported

try:  # jax_triton 0.3.1 raises ImportError on CPU-only jaxlib; triton may be missing altogether.
    import jax_triton as jt
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except Exception as err:  # noqa: BLE001 - any import failure means "not available here"
    jt = triton = tl = None
    _IMPORT_ERROR = err

NUM_WARPS = 4
NUM_STAGES = 2


@functools.cache
def _kernels():
    """Builds the triton.jit kernels (only where triton imports)."""
    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _load_tile(ptr, rows, N: tl.constexpr, NP: tl.constexpr):
        if NP == N:
            return tl.load(ptr)
        else:
            return tl.load(ptr, mask=rows[:, None] < N, other=0.0)

    @triton.jit
    def _store_tile(ptr, val, rows, N: tl.constexpr, NP: tl.constexpr):
        if NP == N:
            tl.store(ptr, val)
        else:
            tl.store(ptr, val, mask=rows[:, None] < N)

    @triton.jit
    def _probs(q, k, rs, qk_scale, Sm: tl.constexpr, SMP: tl.constexpr, OBO: tl.constexpr, IEEE: tl.constexpr):
        # base-2 softmax of (scale * log2 e) q k^T over the chunk's keys, off-by-one optional.
        s = _mm(q, tl.trans(k), IEEE) * qk_scale
        if SMP != Sm:
            s = tl.where(rs[None, :] < Sm, s, float("-inf"))
        m = tl.max(s, 1)
        if OBO:
            m = tl.maximum(m, 0.0)
        p = tl.exp2(s - m[:, None])
        denom = tl.sum(p, 1)
        if OBO:
            denom = denom + tl.exp2(-m)
        return p * (1.0 / denom)[:, None]

    @triton.jit
    def _fwd_body(idx_ptr, w_ptr, q_ptr, k_ptr, v_ptr, o_ptr, qk_scale, C: tl.constexpr, M: tl.constexpr,
                  K: tl.constexpr, Sq: tl.constexpr, Sm: tl.constexpr, H: tl.constexpr, Hkv: tl.constexpr,
                  D: tl.constexpr, SQP: tl.constexpr, SMP: tl.constexpr, OBO: tl.constexpr, IEEE: tl.constexpr):
        # 1D grid, head fastest: neighbouring programs read the other heads' columns of the same
        # K/V rows (whole 1.5 KB rows per chunk instead of 128 B strided pieces).
        h = tl.program_id(0) % H
        pid = tl.program_id(0) // H  # b * C + c
        b = pid // C
        hk = h // (H // Hkv)
        rt = tl.arange(0, SQP)
        rs = tl.arange(0, SMP)
        rd = tl.arange(0, D)
        # 64-bit scalar bases, 32-bit tile offsets (64-bit per-element address math is slow).
        q_base = pid.to(tl.int64) * (Sq * H * D) + h * D
        q_tile = rt[:, None] * (H * D) + rd[None, :]
        kv_tile = rs[:, None] * (Hkv * D) + rd[None, :]
        q = _load_tile(q_ptr + q_base + q_tile, rt, Sq, SQP)
        acc = tl.zeros((SQP, D), dtype=tl.float32)
        for j in range(K):
            i = tl.load(idx_ptr + pid * K + j)
            w = tl.load(w_ptr + pid * K + j).to(tl.float32)
            w = tl.where(i >= 0, w, 0.0)
            i = tl.maximum(i, 0)
            kv_base = (b * M + i).to(tl.int64) * (Sm * Hkv * D) + hk * D
            k = _load_tile(k_ptr + kv_base + kv_tile, rs, Sm, SMP)
            v = _load_tile(v_ptr + kv_base + kv_tile, rs, Sm, SMP)
            p = _probs(q, k, rs, qk_scale, Sm, SMP, OBO, IEEE)
            acc += w * _mm(p.to(v.dtype), v, IEEE)
        _store_tile(o_ptr + q_base + q_tile, acc.to(o_ptr.dtype.element_ty), rt, Sq, SQP)

    @triton.jit
    def _dq_body(idx_ptr, w_ptr, q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dw_ptr, qk_scale, scale,
                 C: tl.constexpr, M: tl.constexpr, K: tl.constexpr, Sq: tl.constexpr, Sm: tl.constexpr,
                 H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, SQP: tl.constexpr, SMP: tl.constexpr,
                 OBO: tl.constexpr, IEEE: tl.constexpr):
        # 1D grid, head fastest: neighbouring programs read the other heads' columns of the same
        # K/V rows (whole 1.5 KB rows per chunk instead of 128 B strided pieces).
        h = tl.program_id(0) % H
        pid = tl.program_id(0) // H  # b * C + c
        b = pid // C
        hk = h // (H // Hkv)
        rt = tl.arange(0, SQP)
        rs = tl.arange(0, SMP)
        rd = tl.arange(0, D)
        q_base = pid.to(tl.int64) * (Sq * H * D) + h * D
        q_tile = rt[:, None] * (H * D) + rd[None, :]
        kv_tile = rs[:, None] * (Hkv * D) + rd[None, :]
        q = _load_tile(q_ptr + q_base + q_tile, rt, Sq, SQP)
        do = _load_tile(do_ptr + q_base + q_tile, rt, Sq, SQP)
        dq = tl.zeros((SQP, D), dtype=tl.float32)
        for j in range(K):
            i = tl.load(idx_ptr + pid * K + j)
            valid = i >= 0
            w = tl.load(w_ptr + pid * K + j).to(tl.float32)
            w = tl.where(valid, w, 0.0)
            i = tl.maximum(i, 0)
            kv_base = (b * M + i).to(tl.int64) * (Sm * Hkv * D) + hk * D
            k = _load_tile(k_ptr + kv_base + kv_tile, rs, Sm, SMP)
            v = _load_tile(v_ptr + kv_base + kv_tile, rs, Sm, SMP)
            p = _probs(q, k, rs, qk_scale, Sm, SMP, OBO, IEEE)
            dp = _mm(do, tl.trans(v), IEEE)
            dd = tl.sum(p * dp, 1)
            ds = p * (dp - dd[:, None])
            dq += w * _mm(ds.to(k.dtype), k, IEEE)
            tl.store(dw_ptr + (pid * H + h) * K + j, tl.where(valid, tl.sum(dd, 0), 0.0))
        _store_tile(dq_ptr + q_base + q_tile, (dq * scale).to(dq_ptr.dtype.element_ty), rt, Sq, SQP)

    @triton.jit
    def _dkdv_body(pairs_ptr, starts_ptr, w_ptr, q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, qk_scale, scale,
                   C: tl.constexpr, M: tl.constexpr, K: tl.constexpr, Sq: tl.constexpr, Sm: tl.constexpr,
                   H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, SQP: tl.constexpr, SMP: tl.constexpr,
                   OBO: tl.constexpr, IEEE: tl.constexpr):
        hk = tl.program_id(0) % Hkv
        pid = tl.program_id(0) // Hkv  # b * M + m
        b = pid // M
        G: tl.constexpr = H // Hkv
        rt = tl.arange(0, SQP)
        rs = tl.arange(0, SMP)
        rd = tl.arange(0, D)
        kv_base = pid.to(tl.int64) * (Sm * Hkv * D) + hk * D
        kv_tile = rs[:, None] * (Hkv * D) + rd[None, :]
        q_tile = rt[:, None] * (H * D) + rd[None, :]
        k = _load_tile(k_ptr + kv_base + kv_tile, rs, Sm, SMP)
        v = _load_tile(v_ptr + kv_base + kv_tile, rs, Sm, SMP)
        start = tl.load(starts_ptr + pid + b)  # starts is [B, M+1]
        end = tl.load(starts_ptr + pid + b + 1)
        dk = tl.zeros((SMP, D), dtype=tl.float32)
        dv = tl.zeros((SMP, D), dtype=tl.float32)
        for n in range(start, end):
            e = tl.load(pairs_ptr + b * (C * K) + n)
            c = e // K
            w = tl.load(w_ptr + b * (C * K) + e).to(tl.float32)
            for g in tl.static_range(G):
                h = hk * G + g
                q_base = (b * C + c).to(tl.int64) * (Sq * H * D) + h * D
                q = _load_tile(q_ptr + q_base + q_tile, rt, Sq, SQP)
                do = _load_tile(do_ptr + q_base + q_tile, rt, Sq, SQP)
                p = _probs(q, k, rs, qk_scale, Sm, SMP, OBO, IEEE)
                if SQP != Sq:
                    p = tl.where(rt[:, None] < Sq, p, 0.0)
                dv += w * _mm(tl.trans(p.to(do.dtype)), do, IEEE)
                dp = _mm(do, tl.trans(v), IEEE)
                dd = tl.sum(p * dp, 1)
                ds = p * (dp - dd[:, None])
                dk += w * _mm(tl.trans(ds.to(q.dtype)), q, IEEE)
        _store_tile(dk_ptr + kv_base + kv_tile, (dk * scale).to(dk_ptr.dtype.element_ty), rs, Sm, SMP)
        _store_tile(dv_ptr + kv_base + kv_tile, dv.to(dv_ptr.dtype.element_ty), rs, Sm, SMP)

    # Entry points (jax_triton order: array inputs, scalars, outputs, then constexpr metaparams); the
    # *_poison variants also take the NaN-filled output buffers that are aliased to the outputs.
    @triton.jit
    def fwd(idx_ptr, w_ptr, q_ptr, k_ptr, v_ptr, qk_scale, o_ptr, C: tl.constexpr, M: tl.constexpr,
            K: tl.constexpr, Sq: tl.constexpr, Sm: tl.constexpr, H: tl.constexpr, Hkv: tl.constexpr,
            D: tl.constexpr, SQP: tl.constexpr, SMP: tl.constexpr, OBO: tl.constexpr, IEEE: tl.constexpr):
        _fwd_body(idx_ptr, w_ptr, q_ptr, k_ptr, v_ptr, o_ptr, qk_scale, C, M, K, Sq, Sm, H, Hkv, D, SQP, SMP,
                  OBO, IEEE)

    @triton.jit
    def fwd_poison(idx_ptr, w_ptr, q_ptr, k_ptr, v_ptr, o_in, qk_scale, o_ptr, C: tl.constexpr,
                   M: tl.constexpr, K: tl.constexpr, Sq: tl.constexpr, Sm: tl.constexpr, H: tl.constexpr,
                   Hkv: tl.constexpr, D: tl.constexpr, SQP: tl.constexpr, SMP: tl.constexpr, OBO: tl.constexpr,
                   IEEE: tl.constexpr):
        _fwd_body(idx_ptr, w_ptr, q_ptr, k_ptr, v_ptr, o_ptr, qk_scale, C, M, K, Sq, Sm, H, Hkv, D, SQP, SMP,
                  OBO, IEEE)

    @triton.jit
    def dq(idx_ptr, w_ptr, q_ptr, k_ptr, v_ptr, do_ptr, qk_scale, scale, dq_ptr, dw_ptr, C: tl.constexpr,
           M: tl.constexpr, K: tl.constexpr, Sq: tl.constexpr, Sm: tl.constexpr, H: tl.constexpr,
           Hkv: tl.constexpr, D: tl.constexpr, SQP: tl.constexpr, SMP: tl.constexpr, OBO: tl.constexpr,
           IEEE: tl.constexpr):
        _dq_body(idx_ptr, w_ptr, q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dw_ptr, qk_scale, scale, C, M, K, Sq, Sm,
                 H, Hkv, D, SQP, SMP, OBO, IEEE)

    @triton.jit
    def dq_poison(idx_ptr, w_ptr, q_ptr, k_ptr, v_ptr, do_ptr, dq_in, dw_in, qk_scale, scale, dq_ptr, dw_ptr,
                  C: tl.constexpr, M: tl.constexpr, K: tl.constexpr, Sq: tl.constexpr, Sm: tl.constexpr,
                  H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, SQP: tl.constexpr, SMP: tl.constexpr,
                  OBO: tl.constexpr, IEEE: tl.constexpr):
        _dq_body(idx_ptr, w_ptr, q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dw_ptr, qk_scale, scale, C, M, K, Sq, Sm,
                 H, Hkv, D, SQP, SMP, OBO, IEEE)

    @triton.jit
    def dkdv(pairs_ptr, starts_ptr, w_ptr, q_ptr, k_ptr, v_ptr, do_ptr, qk_scale, scale, dk_ptr, dv_ptr,
             C: tl.constexpr, M: tl.constexpr, K: tl.constexpr, Sq: tl.constexpr, Sm: tl.constexpr,
             H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, SQP: tl.constexpr, SMP: tl.constexpr,
             OBO: tl.constexpr, IEEE: tl.constexpr):
        _dkdv_body(pairs_ptr, starts_ptr, w_ptr, q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, qk_scale, scale,
                   C, M, K, Sq, Sm, H, Hkv, D, SQP, SMP, OBO, IEEE)

    @triton.jit
    def dkdv_poison(pairs_ptr, starts_ptr, w_ptr, q_ptr, k_ptr, v_ptr, do_ptr, dk_in, dv_in, qk_scale, scale,
                    dk_ptr, dv_ptr, C: tl.constexpr, M: tl.constexpr, K: tl.constexpr, Sq: tl.constexpr,
                    Sm: tl.constexpr, H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, SQP: tl.constexpr,
                    SMP: tl.constexpr, OBO: tl.constexpr, IEEE: tl.constexpr):
        _dkdv_body(pairs_ptr, starts_ptr, w_ptr, q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, qk_scale, scale,
                   C, M, K, Sq, Sm, H, Hkv, D, SQP, SMP, OBO, IEEE)

    return dict(fwd=fwd, fwd_poison=fwd_poison, dq=dq, dq_poison=dq_poison, dkdv=dkdv, dkdv_poison=dkdv_poison)


_LOG2E = 1.4426950408889634


def _launch(name, args, out_shapes, grid, scalars, meta):
    poisoned = poison.POISON_OUTPUTS
    kern = _kernels()[name + ("_poison" if poisoned else "")]
    extra, aliases = (), None
    if poisoned:
        extra = poison.filled_outputs(out_shapes)
        aliases = {len(args) + i: i for i in range(len(out_shapes))}
    return jt.triton_call(
        *args, *extra, *scalars, kernel=kern, out_shape=list(out_shapes), grid=grid, num_warps=NUM_WARPS,
        num_stages=NUM_STAGES, input_output_aliases=aliases, name=f"gca_{name}_triton", **meta,
    )


def _meta(q, k_mem, indices, obo):
    B, C, Sq, H, D = q.shape
    _, M, Sm, Hkv, _ = k_mem.shape
    return dict(C=C, M=M, K=indices.shape[2], Sq=Sq, Sm=Sm, H=H, Hkv=Hkv, D=D, SQP=max(16, next_pow2(Sq)),
                SMP=max(16, next_pow2(Sm)), OBO=bool(obo), IEEE=q.dtype == jnp.float32)


def _forward(q, k_mem, v_mem, indices, weights, obo, scale):
    meta = _meta(q, k_mem, indices, obo)
    B, C, H = q.shape[0], q.shape[1], q.shape[3]
    (out,) = _launch("fwd", (indices, weights, q, k_mem, v_mem), [jax.ShapeDtypeStruct(q.shape, q.dtype)],
                     (B * C * H,), (float(scale * _LOG2E),), meta)
    return out


def _backward(q, k_mem, v_mem, indices, weights, do, obo, scale):
    meta = _meta(q, k_mem, indices, obo)
    B, C, _, H, _ = q.shape
    M, Hkv, K = k_mem.shape[1], k_mem.shape[3], indices.shape[2]
    sc = (float(scale * _LOG2E), float(scale))
    dq, dw = _launch(
        "dq", (indices, weights, q, k_mem, v_mem, do),
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, C, H, K), jnp.float32)], (B * C * H,), sc, meta,
    )
    pairs, starts = common_vjp.inverse_index(indices, M)
    dk, dv = _launch(
        "dkdv", (pairs, starts, weights, q, k_mem, v_mem, do),
        [jax.ShapeDtypeStruct(k_mem.shape, k_mem.dtype), jax.ShapeDtypeStruct(v_mem.shape, v_mem.dtype)],
        (B * M * Hkv,), sc, meta,
    )
    dw = jnp.where(indices >= 0, jnp.sum(dw, axis=2), 0.0).astype(weights.dtype)
    return dq, dk, dv, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _gca(q, k_mem, v_mem, indices, weights, obo, scale):
    return _forward(q, k_mem, v_mem, indices, weights, obo, scale)


def _gca_fwd(q, k_mem, v_mem, indices, weights, obo, scale):
    return _forward(q, k_mem, v_mem, indices, weights, obo, scale), (q, k_mem, v_mem, indices, weights)


def _gca_bwd(obo, scale, res, do):
    q, k_mem, v_mem, indices, weights = res
    dq, dk, dv, dw = _backward(q, k_mem, v_mem, indices, weights, do.astype(q.dtype), obo, scale)
    return dq, dk, dv, None, dw


_gca.defvjp(_gca_fwd, _gca_bwd)


def gca_triton(q, k_mem, v_mem, indices, weights, *, softmax_off_by_one=True, scale=None):
    """Same contract as `gca_reference`; raises `Unsupported` where it cannot run."""
    if _IMPORT_ERROR is not None:
        raise Unsupported(f"triton / jax_triton not importable here ({_IMPORT_ERROR})")
    if jax.default_backend() != "gpu":
        raise Unsupported(f"triton needs a GPU (backend is {jax.default_backend()})")
    common_vjp.check_dtypes(q, k_mem, v_mem, weights)
    common_vjp.check_one_tile("triton", q, k_mem)
    scale = common_vjp.resolve_scale(scale, q.shape[-1])
    return _gca(q, k_mem, v_mem, indices.astype(jnp.int32), weights.astype(jnp.float32)
                if weights.dtype != jnp.float32 else weights, bool(softmax_off_by_one), scale)
