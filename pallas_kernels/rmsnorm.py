"""RMSNorm, optionally fused with the residual add before it, with its gradient in one pass.

    s = x + residual          (rounded to x's dtype, as the unfused add is; s = x without a residual)
    y = s / sqrt(mean(s^2) + eps) * gain       (float32 inside, y in out_dtype)

x, residual [..., d]; gain [d]. With a residual the op returns (s, y): the layer keeps s as its residual
stream and feeds y to the next projection. With `copies` n > 1, y is returned as n arrays, one for each
reader (self-attention's q, k and v projections): their gradients reach the backward kernel one by one
and are summed as it reads them, where autodiff would sum them in a pass of their own. XLA emits the
forward as two passes (the add and the sum of squares, then the scaling: five reads and writes of a row
where four do) and the backward as a row reduction, a column reduction for d gain and an elementwise
pass.

  "reference":  the maths in jnp; its gradient is autodiff's.
  "pallas_gpu": Pallas kernels lowered through Triton. The forward reads x (and residual) once and
                writes s and y; the backward reads s, each d y (and d s) once and writes d x with a
                partial d gain per program, summed by XLA.
  "auto":       pallas_gpu on a GPU, else the reference.

The dispatcher tries the candidates in order; one that cannot take a call says why in a log line.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import per_shard, poison
from pallas_kernels.blocks import largest_pow2_divisor, next_pow2
from pallas_kernels.dispatch import KernelOp, Unsupported, require_gpu

_GAIN = (None,)


def _acc(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def residual_add(x, residual):
    """x + residual [..., d] in x's dtype, summed in float32 and rounded once: the kernel's s, and the
    sum a caller takes where no norm follows, so that both round alike."""
    return (x.astype(_acc(x.dtype)) + residual.astype(_acc(x.dtype))).astype(x.dtype)


def rms_norm_reference(x, residual, gain, *, eps: float, out_dtype):
    """x, residual (or None) [..., d], gain [d] -> (s [..., d] in x's dtype, y [..., d] in out_dtype)."""
    s = x if residual is None else residual_add(x, residual)
    s32 = s.astype(_acc(s.dtype))
    y = s32 * jax.lax.rsqrt(jnp.mean(s32 * s32, axis=-1, keepdims=True) + eps)
    return s, (y * gain.astype(y.dtype)).astype(out_dtype)


def _cols(d: int):
    """A row of d columns is loaded as the next power of two of them, masked."""
    bd = next_pow2(d)
    return bd, jnp.arange(bd) < d


def _fwd_kernel(*refs, bm, d, eps, has_residual):
    if has_residual:
        x_ref, r_ref, g_ref, s_ref, y_ref = refs
    else:
        (x_ref, g_ref, y_ref), r_ref, s_ref = refs, None, None
    bd, mask = _cols(d)
    rows, cols = pl.ds(pl.program_id(0) * bm, bm), pl.ds(0, bd)
    x = pltriton.load(x_ref.at[rows, cols], mask=mask[None, :], other=0.0)
    if has_residual:
        r = pltriton.load(r_ref.at[rows, cols], mask=mask[None, :], other=0.0)
        x = (x.astype(jnp.float32) + r.astype(jnp.float32)).astype(s_ref.dtype)
        pltriton.store(s_ref.at[rows, cols], x, mask=mask[None, :])
    s = x.astype(jnp.float32)
    g = pltriton.load(g_ref.at[cols], mask=mask, other=0.0).astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.sum(s * s, axis=1) / d + eps)
    pltriton.store(y_ref.at[rows, cols], (s * rstd[:, None] * g[None, :]).astype(y_ref.dtype), mask=mask[None, :])


def _bwd_kernel(*refs, bm, steps, d, eps, has_ds):
    s_ref, g_ref, dy_ref, *rest, dx_ref, dg_ref = refs
    ds_ref, more_dy = (rest[0], rest[1:]) if has_ds else (None, rest)
    bd, mask = _cols(d)
    cols = pl.ds(0, bd)
    g = pltriton.load(g_ref.at[cols], mask=mask, other=0.0).astype(jnp.float32)
    first = pl.program_id(0) * bm * steps

    def body(i, dg):
        rows = pl.ds(first + i * bm, bm)
        s = pltriton.load(s_ref.at[rows, cols], mask=mask[None, :], other=0.0).astype(jnp.float32)
        dy = pltriton.load(dy_ref.at[rows, cols], mask=mask[None, :], other=0.0).astype(jnp.float32)
        for ref in more_dy:
            dy = dy + pltriton.load(ref.at[rows, cols], mask=mask[None, :], other=0.0).astype(jnp.float32)
        rstd = jax.lax.rsqrt(jnp.sum(s * s, axis=1) / d + eps)
        n = s * rstd[:, None]
        dn = dy * g[None, :]
        dx = rstd[:, None] * (dn - n * (jnp.sum(dn * n, axis=1) / d)[:, None])
        if has_ds:
            dx = dx + pltriton.load(ds_ref.at[rows, cols], mask=mask[None, :], other=0.0).astype(jnp.float32)
        pltriton.store(dx_ref.at[rows, cols], dx.astype(dx_ref.dtype), mask=mask[None, :])
        return dg + jnp.sum(dy * n, axis=0)

    dg = jax.lax.fori_loop(0, steps, body, jnp.zeros((bd,), jnp.float32))
    pltriton.store(dg_ref.at[pl.ds(pl.program_id(0), 1), cols], dg[None, :], mask=mask[None, :])


def _check(x, interpret):
    require_gpu("pallas_gpu", interpret)
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise Unsupported(f"dtype {x.dtype} (float32 or bfloat16)")
    if x.shape[-1] > 8192:
        raise Unsupported(f"width {x.shape[-1]} (a row is one block: at most 8,192)")


def rms_norm_fwd_pallas_gpu(x, residual, gain, *, eps: float, out_dtype, interpret: bool = False):
    """The reference's (s, y) as a Pallas (Triton) kernel; `interpret` runs it on any backend (tests)."""
    _check(x, interpret)
    if residual is not None and residual.dtype != x.dtype:
        raise Unsupported(f"residual dtype {residual.dtype} differs from x's {x.dtype}")
    *lead, d = x.shape
    N = math.prod(lead)
    x, residual = x.reshape(N, d), None if residual is None else residual.reshape(N, d)
    has_residual = residual is not None
    out_shapes = [jax.ShapeDtypeStruct((N, d), jnp.dtype(out_dtype))]
    if has_residual:
        out_shapes.insert(0, jax.ShapeDtypeStruct((N, d), x.dtype))
    bm = largest_pow2_divisor(N, 4)
    outs = poison.pallas_call(
        functools.partial(_fwd_kernel, bm=bm, d=d, eps=float(eps), has_residual=has_residual),
        out_shapes=out_shapes, grid=(N // bm,),
        args=(x, residual, gain) if has_residual else (x, gain),
        interpret=interpret, name="rms_norm_fwd_pallas_gpu",
    )
    s, y = outs if has_residual else (x, outs[0])
    return s.reshape(*lead, d), y.reshape(*lead, d)


def rms_norm_bwd_pallas_gpu(s, gain, dy, ds, *more_dy, eps: float, interpret: bool = False):
    """s [..., d], gain [d], d y [..., d], d s [..., d] or None, more_dy: the other copies' d y [..., d]
    -> (d x [..., d] in s's dtype, d gain partials [P, d] float32). A program walks `steps` blocks of rows
    and writes its partial d gain; the caller sums the partials."""
    _check(s, interpret)
    *lead, d = s.shape
    N = math.prod(lead)
    s, dy, ds = s.reshape(N, d), dy.reshape(N, d), None if ds is None else ds.reshape(N, d)
    more_dy = tuple(m.reshape(N, d) for m in more_dy)
    bm = largest_pow2_divisor(N, 4)
    steps = largest_pow2_divisor(N // bm, 16)
    programs = N // (bm * steps)
    has_ds = ds is not None
    dx, dg = poison.pallas_call(
        functools.partial(_bwd_kernel, bm=bm, steps=steps, d=d, eps=float(eps), has_ds=has_ds),
        out_shapes=[jax.ShapeDtypeStruct((N, d), s.dtype), jax.ShapeDtypeStruct((programs, d), jnp.float32)],
        grid=(programs,),
        args=(s, gain, dy, *((ds,) if has_ds else ()), *more_dy),
        interpret=interpret, name="rms_norm_bwd_pallas_gpu",
    )
    return dx.reshape(*lead, d), dg


def rms_norm_bwd_reference(s, gain, dy, ds, *more_dy, eps: float):
    """The reference's gradient by autodiff, in the kernel's form: (d x, d gain partials [1, d]); the
    copies' d y are summed in float32, as the kernel sums them."""
    if more_dy:
        dy = sum((m.astype(jnp.float32) for m in more_dy), dy.astype(jnp.float32))
    _, vjp = jax.vjp(lambda s, g: rms_norm_reference(s, None, g, eps=eps, out_dtype=dy.dtype)[1], s, gain)
    dx, dg = vjp(dy)
    if ds is not None:
        dx = residual_add(dx.astype(s.dtype), ds)
    return dx, dg.astype(jnp.float32)[None, :]


# drt_jax.config.NORM_IMPLS lists the same names for model.norm_impl.
FORWARD = KernelOp("RMSNorm", {"reference": rms_norm_reference, "pallas_gpu": rms_norm_fwd_pallas_gpu},
                   {"gpu": ("pallas_gpu",)})
GRADIENT = KernelOp("RMSNorm gradient", {"reference": rms_norm_bwd_reference, "pallas_gpu": rms_norm_bwd_pallas_gpu},
                    {"gpu": ("pallas_gpu",)})


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _fused(x, residual, gain, eps, out_dtype, impl, kernel_mesh, layout):
    """layout: (whether residual is given, the number of copies of y), the output's structure."""
    return _fused_fwd(x, residual, gain, eps, out_dtype, impl, kernel_mesh, layout)[0]


def _fused_fwd(x, residual, gain, eps, out_dtype, impl, kernel_mesh, layout):
    # symbolic_zeros below: the differentiable arguments arrive as CustomVJPPrimal(value, perturbed).
    x, residual, gain = (a.value if isinstance(a, CustomVJPPrimal) else a for a in (x, residual, gain))
    rows = _rows(x.ndim)
    s, y = FORWARD(impl, (x, residual, gain), (rows, rows, _GAIN), (rows, rows), kernel_mesh,
                   eps=eps, out_dtype=out_dtype)
    return _structure(s, y, layout), (s, gain)


def _structure(s, y, layout):
    has_residual, copies = layout
    y = (y,) * copies if copies > 1 else y
    return (s, y) if has_residual else y


def _fused_bwd(eps, out_dtype, impl, kernel_mesh, layout, saved, cotangent):
    s, gain = saved
    has_residual, copies = layout
    ds, dy = cotangent if has_residual else (None, cotangent)
    # A caller that discards the sum (the final norms; GCA's MLP norm in the authors' wiring) gives it a
    # symbolic zero cotangent: the kernel then reads no d s, and no zeros are written for it. A copy of y
    # that no one reads is left out of the sum the same way.
    if isinstance(ds, SymbolicZero):
        ds = None
    dys = [d for d in (dy if copies > 1 else (dy,)) if not isinstance(d, SymbolicZero)]
    if not dys:
        dys = [jnp.zeros(s.shape, out_dtype)]
    rows = _rows(s.ndim)
    args = (s, gain, dys[0].astype(out_dtype), None if ds is None else ds.astype(s.dtype),
            *(d.astype(out_dtype) for d in dys[1:]))
    dx, dg = GRADIENT(impl, args, (rows, _GAIN, rows, rows, *(rows,) * (len(dys) - 1)), (rows, ("batch", None)),
                      kernel_mesh, eps=eps)
    dg = jnp.sum(dg, axis=0).astype(gain.dtype)
    return dx, (dx if has_residual else None), dg


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def _rows(ndim: int) -> per_shard.Layout:
    return ("batch",) + (None,) * (ndim - 1)


def rms_norm(x, gain, *, residual=None, eps: float, out_dtype=None, impl: str = "auto",
             kernel_mesh: per_shard.KernelMesh | None = None, copies: int = 1):
    """x [..., d] (batch first), gain [d] -> y [..., d] in out_dtype (default x's); with `residual`
    [..., d], (s, y) with s = x + residual; with `copies` n > 1, y is a tuple of n arrays, one a reader
    (see the module docstring). Differentiable; `impl` picks the kernels (see the module docstring), run
    per batch shard under a `kernel_mesh`."""
    if residual is not None and (residual.shape, residual.dtype) != (x.shape, x.dtype):
        raise ValueError(f"rms_norm: residual {residual.dtype}{list(residual.shape)} does not match x "
                         f"{x.dtype}{list(x.shape)}; cast or reshape it")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if FORWARD.candidates(impl) == ["reference"]:
        # No kernel to try: autodiff of the reference, which XLA fuses with its neighbours.
        s, y = rms_norm_reference(x, residual, gain, eps=eps, out_dtype=out_dtype)
        return _structure(s, y, (residual is not None, copies))
    return _fused(x, residual, gain, float(eps), out_dtype, impl, kernel_mesh, (residual is not None, int(copies)))
