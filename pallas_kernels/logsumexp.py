"""The loss head's log-normaliser: log sum exp over the first `valid` columns of each row of a block of
logits [..., Vp] (Vp: the vocabulary padded to a multiple of 128; the padded columns do not count), and
the same with the cross-entropy's gradient (`row_logsumexp_with_grad`, below), which the blocked loss
takes when it is differentiated.

  "reference":  `logsumexp_one_pass` in jnp, one read of the logits. XLA's variadic reduction takes an
                exp per element and a rescaling per merge; on an H100 it ran at 1.5 TB/s, where the
                d logits pass over the same bytes runs at 2.6. The gradient's reference adds that
                pass: (softmax - one hot) x weight.
  "pallas_gpu": Pallas kernels lowered through Triton: each program walks a few rows in tiles of
                columns, one exp per element, a running max and sum per row; the gradient's kernel
                then walks the rows again and writes the gradient. Tested against float64 under the
                Pallas interpreter and compiled on a GPU.
  "auto":       pallas_gpu on a GPU, else the reference.

Neither op is differentiable: the blocked loss forms its own gradient, with the second. The dispatcher
tries the candidates in order; one that cannot take a call says why in a log line.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import per_shard, poison
from pallas_kernels.blocks import largest_pow2_divisor
from pallas_kernels.dispatch import KernelOp, Unsupported, require_gpu


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How the kernel walks the logits: `rows` rows a program (at most; a power of two dividing the row
    count), tiles of `tile_bytes` per row (2,048 bfloat16 or 1,024 float32 columns by default), and
    Triton's warps and software-pipelining stages (the defaults are Pallas's own). `programs` (the
    gradient kernel's): at most this many programs, each walking its share of the row blocks one after
    another; 0 for one program a block of rows. bench/log_normaliser.py times the choices."""

    rows: int = 4
    tile_bytes: int = 4096
    num_warps: int = 4
    num_stages: int = 3
    programs: int = 0

    def __post_init__(self):
        for name in ("rows", "tile_bytes", "num_warps", "programs"):
            v = getattr(self, name)
            if (v < 1 and not (name == "programs" and v == 0)) or v & (v - 1):
                raise ValueError(f"Tiling.{name}={v}: use a power of two" + (" (or 0)" if name == "programs" else ""))


DEFAULT_TILING = Tiling()


def _online_max_sum(a, b):
    """Merges two (max, sum of exp(x - max)) pairs with one exp: the pair with the larger max keeps its
    sum and the other's is scaled by exp(-|m1 - m2|) (scaling both by exp(m_i - max) costs a second exp
    that is always exp(0))."""
    (m1, s1), (m2, s2) = a, b
    first = m1 >= m2
    gap = jnp.where(m1 == m2, 0.0, -jnp.abs(m1 - m2))  # equal infinities differ by nan, not by a gap
    e = jnp.exp(gap)
    return jnp.where(first, m1, m2), jnp.where(first, s1 + s2 * e, s1 * e + s2)


def logsumexp_one_pass(x):
    """log sum exp over the last axis of float32 x [..., V] in one read of x: a running (max, sum of
    exp(x - max)) pair, rescaled as the max grows. jax.nn.logsumexp reads x twice (the max, then the
    sum), and on a block of vocabulary-wide logits each read is a pass over the block in memory.
    A row that is all -inf gives -inf."""
    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(0.0, x.dtype))
    m, s = jax.lax.reduce((x, jnp.ones_like(x)), init, _online_max_sum, (x.ndim - 1,))
    return m + jnp.log(s)


def logsumexp_reference(x, valid: int):
    """x [..., Vp] (any float dtype) -> float32 [...]: log sum exp of x[..., :valid]."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if valid != x.shape[-1]:
        x = jnp.where(jnp.arange(x.shape[-1]) < valid, x, -jnp.inf)
    return logsumexp_one_pass(x)


def _load_tile(x_ref, rows, t, *, bv, valid):
    """Tile t of `rows` -> (its column indices [bv], float32 [bm, bv] with -inf from column `valid` on)."""
    cols = t * bv + jnp.arange(bv)
    x = pltriton.load(x_ref.at[rows, pl.ds(t * bv, bv)], mask=(cols < valid)[None, :], other=-jnp.inf)
    return cols, x.astype(jnp.float32)


def _row_logsumexp(x_ref, rows, *, bm, bv, valid):
    """log sum exp of `rows`' first `valid` columns [bm], one sweep of tiles with a running max and sum."""

    def body(t, carry):
        m, s = carry
        x = _load_tile(x_ref, rows, t, bv=bv, valid=valid)[1]
        m_new = jnp.maximum(m, jnp.max(x, axis=1))
        base = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with no finite value yet stays (-inf, 0)
        s = s * jnp.exp(m - base) + jnp.sum(jnp.exp(x - base[:, None]), axis=1)
        return m_new, s

    init = (jnp.full((bm,), -jnp.inf, jnp.float32), jnp.zeros((bm,), jnp.float32))
    m, s = jax.lax.fori_loop(0, pl.cdiv(valid, bv), body, init)
    return m + jnp.log(s)


def _kernel(x_ref, out_ref, *, bm, bv, valid):
    rows = pl.ds(pl.program_id(0) * bm, bm)
    out_ref[rows] = _row_logsumexp(x_ref, rows, bm=bm, bv=bv, valid=valid)


def logsumexp_pallas_gpu(x, valid: int, *, interpret: bool = False, tiling: Tiling = DEFAULT_TILING):
    """The reference's result as a Pallas (Triton) kernel; `interpret` runs it on any backend (tests)."""
    require_gpu("pallas_gpu", interpret)
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise Unsupported(f"logits dtype {x.dtype} (float32 or bfloat16)")
    if tiling.programs:
        raise ValueError(f"Tiling.programs={tiling.programs} is the gradient kernel's; leave it 0 here")
    *lead, Vp = x.shape
    R = math.prod(lead)
    bm = largest_pow2_divisor(R, tiling.rows)
    bv = max(1, tiling.tile_bytes // x.dtype.itemsize)
    (out,) = poison.pallas_call(
        functools.partial(_kernel, bm=bm, bv=bv, valid=int(valid)),
        out_shapes=[jax.ShapeDtypeStruct((R,), jnp.float32)],
        grid=(R // bm,),
        args=(x.reshape(R, Vp),),
        interpret=interpret,
        name="logsumexp_pallas_gpu",
        compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
    )
    return out.reshape(lead)


# drt_jax.config.LSE_IMPLS lists the same names for model.lse_impl.
# The reference runs as XLA partitions it: the logits' vocabulary may be split over the tensor axis.
LOG_NORMALISER = KernelOp("log-normaliser", {"reference": logsumexp_reference, "pallas_gpu": logsumexp_pallas_gpu},
                          {"gpu": ("pallas_gpu",)}, reference_per_shard=False)


def row_logsumexp(x, valid: int, *, impl: str = "auto", kernel_mesh: per_shard.KernelMesh | None = None):
    """x [B, k, Vp] -> float32 [B, k]: log sum exp of each row's first `valid` columns; a kernel runs per
    batch shard under a `kernel_mesh`."""
    return LOG_NORMALISER(impl, (x,), (("batch", None, None),), ("batch", None), kernel_mesh, valid=valid)


def softmax_grad_reference(x, targets, weights, valid: int, out_dtype):
    """x [..., Vp], targets [...] int (< valid), weights [...] -> (float32 lse [...], d [..., Vp] in
    out_dtype): the log-normaliser and the gradient of weights x (lse - x[target]) with respect to x,
    (softmax(x[:valid]) - one_hot(target)) x weight, zero on the padded columns."""
    lse = logsumexp_reference(x, valid)
    return lse, softmax_grad_given_lse(x, lse, targets, weights, valid, out_dtype)


def softmax_grad_given_lse(x, lse, targets, weights, valid: int, out_dtype):
    """The gradient of `softmax_grad_reference` from a log-normaliser already taken: d [..., Vp]."""
    p = jnp.exp(x.astype(jnp.float32) - lse[..., None])
    cols = jnp.arange(x.shape[-1])
    p = jnp.where(cols < valid, p, 0.0)
    d = (p - (cols == targets[..., None])) * weights[..., None].astype(jnp.float32)
    return d.astype(out_dtype)


def _grad_kernel(x_ref, t_ref, w_ref, lse_ref, d_ref, *, bm, bv, valid, width, programs, steps):
    # Program p takes the row blocks p, p + programs, ... (Tiling.programs). The default, one program a
    # block of rows, keeps the most loads in flight; fewer programs, so that a row would still be in L2
    # for its second sweep, ran slower on an H100 (docs/results.md).
    pid = pl.program_id(0)

    def row_block(j, carry):
        rows = pl.ds((pid + j * programs) * bm, bm)
        lse = _row_logsumexp(x_ref, rows, bm=bm, bv=bv, valid=valid)
        lse_ref[rows] = lse
        target, weight = t_ref[rows], w_ref[rows].astype(jnp.float32)

        # Every column is written, zeros on the padding.
        def grad(t, carry):
            cols, x = _load_tile(x_ref, rows, t, bv=bv, valid=valid)
            d = (jnp.exp(x - lse[:, None]) - (cols[None, :] == target[:, None])) * weight[:, None]
            pltriton.store(d_ref.at[rows, pl.ds(t * bv, bv)], d.astype(d_ref.dtype), mask=(cols < width)[None, :])
            return carry

        return jax.lax.fori_loop(0, pl.cdiv(width, bv), grad, carry)

    jax.lax.fori_loop(0, steps, row_block, 0)


DEFAULT_GRAD_TILING = Tiling(rows=1, tile_bytes=8192, num_warps=8)


def softmax_grad_pallas_gpu(x, targets, weights, valid: int, out_dtype, *, interpret: bool = False,
                            tiling: Tiling = DEFAULT_GRAD_TILING):
    """The reference's result as one Pallas (Triton) kernel: each program sweeps its rows twice, the
    first time for the running max and sum, the second for the gradient; `interpret` runs it on any
    backend (tests)."""
    require_gpu("pallas_gpu", interpret)
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise Unsupported(f"logits dtype {x.dtype} (float32 or bfloat16)")
    *lead, Vp = x.shape
    R = math.prod(lead)
    bm = largest_pow2_divisor(R, tiling.rows)
    bv = max(1, tiling.tile_bytes // x.dtype.itemsize)
    programs = largest_pow2_divisor(R // bm, tiling.programs) if tiling.programs else R // bm
    lse, d = poison.pallas_call(
        functools.partial(_grad_kernel, bm=bm, bv=bv, valid=int(valid), width=Vp, programs=programs,
                          steps=R // bm // programs),
        out_shapes=[jax.ShapeDtypeStruct((R,), jnp.float32), jax.ShapeDtypeStruct((R, Vp), jnp.dtype(out_dtype))],
        grid=(programs,),
        args=(x.reshape(R, Vp), targets.reshape(R).astype(jnp.int32), weights.reshape(R)),
        interpret=interpret,
        name="softmax_grad_pallas_gpu",
        compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
    )
    return lse.reshape(lead), d.reshape(x.shape)


SOFTMAX_GRADIENT = KernelOp("log-normaliser with gradient",
                            {"reference": softmax_grad_reference, "pallas_gpu": softmax_grad_pallas_gpu},
                            {"gpu": ("pallas_gpu",)}, reference_per_shard=False)


def row_logsumexp_with_grad(x, targets, weights, valid: int, *, out_dtype, impl: str = "auto",
                            kernel_mesh: per_shard.KernelMesh | None = None):
    """x [B, k, Vp], targets [B, k] (< valid), weights [B, k] -> (float32 lse [B, k], d x [B, k, Vp] in
    out_dtype): `row_logsumexp` and the gradient of sum(weights x (lse - x[targets])) in one pass over
    the logits, where the log-normaliser and then XLA's gradient pass read them twice. A kernel runs
    per batch shard under a `kernel_mesh`; `impl` takes the log-normaliser's names (model.lse_impl)."""
    return SOFTMAX_GRADIENT(impl, (x, targets, weights), (("batch", None, None), ("batch", None), ("batch", None)),
                            (("batch", None), ("batch", None, None)), kernel_mesh, valid=valid, out_dtype=out_dtype)
