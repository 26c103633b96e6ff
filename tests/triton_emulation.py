"""A NumPy stand-in for `pallas_kernels.gca.triton_gpu._launch` (no tests here), so the Triton GCA path can
be checked where triton cannot run: the wrapper's JAX side (argument order, output shapes, grids, the
constexpr metaparameters, the base-2 scale, the inverse index, the dweights reduction) feeds kernels that
follow the Triton programs line by line over flat buffers, with the same pointer arithmetic, padding masks
and off-by-one softmax. Outputs start as NaN, so an element no program writes fails the comparison."""

from __future__ import annotations

import jax
import numpy as np


def _load(buf, base, row_stride, D, N, NP):
    """tl.load of an [NP, D] tile at base + row * row_stride + col; rows >= N read as 0."""
    tile = np.zeros((NP, D), np.float64)
    for r in range(N):
        tile[r] = buf[base + r * row_stride : base + r * row_stride + D]
    return tile


def _store(buf, base, val, row_stride, N):
    for r in range(N):
        buf[base + r * row_stride : base + r * row_stride + val.shape[1]] = val[r]


def _probs(q, k, qk_scale, Sm, SMP, obo):
    s = q @ k.T * qk_scale
    s[:, np.arange(SMP) >= Sm] = -np.inf
    m = s.max(1)
    if obo:
        m = np.maximum(m, 0.0)
    p = np.exp2(s - m[:, None])
    denom = p.sum(1) + (np.exp2(-m) if obo else 0.0)
    return p / denom[:, None]


def _query_programs(grid, idx, w, q, k, v, qk_scale, *, C, M, K, Sq, Sm, H, Hkv, D, SQP, SMP, OBO):
    """The fwd and dq programs' shared reads: per (query chunk, head) program, its base, then per
    retrieved slot j its index, weight (0 for an empty slot), key/value tiles and probabilities."""
    for prog in range(grid[0]):
        h, pid = prog % H, prog // H
        b, hk = pid // C, h // (H // Hkv)
        q_base = pid * (Sq * H * D) + h * D
        qt = _load(q, q_base, H * D, D, Sq, SQP)
        slots = []
        for j in range(K):
            i = int(idx[pid * K + j])
            kv_base = (b * M + max(i, 0)) * (Sm * Hkv * D) + hk * D
            kt = _load(k, kv_base, Hkv * D, D, Sm, SMP)
            vt = _load(v, kv_base, Hkv * D, D, Sm, SMP)
            slots.append((j, i, float(w[pid * K + j]) if i >= 0 else 0.0, kt, vt, _probs(qt, kt, qk_scale, Sm, SMP, OBO)))
        yield pid, h, q_base, slots


def _fwd(grid, idx, w, q, k, v, qk_scale, *, C, M, K, Sq, Sm, H, Hkv, D, SQP, SMP, OBO, o):
    shape = dict(C=C, M=M, K=K, Sq=Sq, Sm=Sm, H=H, Hkv=Hkv, D=D, SQP=SQP, SMP=SMP, OBO=OBO)
    for _, _, q_base, slots in _query_programs(grid, idx, w, q, k, v, qk_scale, **shape):
        acc = np.zeros((SQP, D))
        for _, _, wj, _, vt, p in slots:
            acc += wj * p @ vt
        _store(o, q_base, acc, H * D, Sq)


def _dq(grid, idx, w, q, k, v, do, qk_scale, scale, *, C, M, K, Sq, Sm, H, Hkv, D, SQP, SMP, OBO, dq, dw):
    shape = dict(C=C, M=M, K=K, Sq=Sq, Sm=Sm, H=H, Hkv=Hkv, D=D, SQP=SQP, SMP=SMP, OBO=OBO)
    for pid, h, q_base, slots in _query_programs(grid, idx, w, q, k, v, qk_scale, **shape):
        dot = _load(do, q_base, H * D, D, Sq, SQP)
        acc = np.zeros((SQP, D))
        for j, i, wj, kt, vt, p in slots:
            dp = dot @ vt.T
            dd = (p * dp).sum(1)
            acc += wj * (p * (dp - dd[:, None])) @ kt
            dw[(pid * H + h) * K + j] = dd.sum() if i >= 0 else 0.0
        _store(dq, q_base, acc * scale, H * D, Sq)


def _dkdv(grid, pairs, starts, w, q, k, v, do, qk_scale, scale, *, C, M, K, Sq, Sm, H, Hkv, D, SQP, SMP, OBO,
          dk, dv):
    G = H // Hkv
    for prog in range(grid[0]):
        hk, pid = prog % Hkv, prog // Hkv
        b = pid // M
        kv_base = pid * (Sm * Hkv * D) + hk * D
        kt = _load(k, kv_base, Hkv * D, D, Sm, SMP)
        vt = _load(v, kv_base, Hkv * D, D, Sm, SMP)
        dk_acc, dv_acc = np.zeros((SMP, D)), np.zeros((SMP, D))
        for n in range(int(starts[pid + b]), int(starts[pid + b + 1])):  # starts is [B, M + 1]
            e = int(pairs[b * (C * K) + n])
            c, we = e // K, float(w[b * (C * K) + e])
            for g in range(G):
                q_base = (b * C + c) * (Sq * H * D) + (hk * G + g) * D
                qt = _load(q, q_base, H * D, D, Sq, SQP)
                dot = _load(do, q_base, H * D, D, Sq, SQP)
                p = _probs(qt, kt, qk_scale, Sm, SMP, OBO)
                p[np.arange(SQP) >= Sq] = 0.0
                dv_acc += we * p.T @ dot
                dp = dot @ vt.T
                dd = (p * dp).sum(1)
                dk_acc += we * (p * (dp - dd[:, None])).T @ qt
        _store(dk, kv_base, dk_acc * scale, Hkv * D, Sm)
        _store(dv, kv_base, dv_acc, Hkv * D, Sm)


_KERNELS = {"fwd": (_fwd, ("o",)), "dq": (_dq, ("dq", "dw")), "dkdv": (_dkdv, ("dk", "dv"))}


def emulated_launch(name, args, out_shapes, grid, scalars, meta):
    """Same contract as triton_gpu._launch: array inputs, then scalars, then outputs of out_shapes."""
    kernel, out_names = _KERNELS[name]
    meta = {key: meta[key] for key in ("C", "M", "K", "Sq", "Sm", "H", "Hkv", "D", "SQP", "SMP", "OBO")}

    def host(*arrays):
        flat = [np.asarray(a, np.float64 if np.issubdtype(np.asarray(a).dtype, np.floating) else np.int64).ravel()
                for a in arrays]
        outs = {n: np.full(int(np.prod(s.shape)), np.nan) for n, s in zip(out_names, out_shapes, strict=True)}
        kernel(grid, *flat, *scalars, **meta, **outs)
        return tuple(outs[n].reshape(s.shape).astype(s.dtype) for n, s in zip(out_names, out_shapes, strict=True))

    return list(jax.pure_callback(host, tuple(out_shapes), *args))
