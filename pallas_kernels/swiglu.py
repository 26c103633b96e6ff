"""SwiGLU, silu(gate) * up, whose gradient comes back as one [..., 2, F] array in one pass.

The MLP runs its gate and up projections as one GEMM into gate_up [..., 2, F] (row 0 the gate, row 1
the up projection), so the backward's input gradient and weight gradients are one GEMM each if the
gradient arrives as one array too. The forward is XLA's (one elementwise pass at the memory's speed).
The backward reads gate, up and the incoming gradient once and writes both gradients:

  "reference":  the same maths in jnp. XLA does not emit it as one pass: on an H100 it took the
                sigmoid in one kernel and stacked the two gradients in a second (1.9 GB a layer of
                drt-133m at 16K x 4, where one pass moves 1.4 GB).
  "pallas_gpu": a Pallas kernel lowered through Triton, one program per block of rows and columns.
  "auto":       pallas_gpu on a GPU, else the reference.

The dispatcher tries the candidates in order; one that cannot take a call says why in a log line.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import per_shard, poison
from pallas_kernels.blocks import largest_pow2_divisor
from pallas_kernels.dispatch import KernelOp, Unsupported, require_gpu

# Inside a kernel mesh the MLP width splits over the head axes, as the "mlp" parameters do over "tensor".
_GATE_UP = ("batch", None, None, "heads")
_OUT = ("batch", None, "heads")


def swiglu_grad_reference(gate_up, d_out):
    """gate_up [..., 2, F], d_out [..., F] -> d gate_up [..., 2, F], formed in float32, rounded once."""
    acc = jnp.promote_types(gate_up.dtype, jnp.float32)
    gate, up = gate_up[..., 0, :].astype(acc), gate_up[..., 1, :].astype(acc)
    d_out = d_out.astype(acc)
    sig = jax.nn.sigmoid(gate)
    d_up = d_out * gate * sig
    d_gate = d_out * up * sig * (1.0 + gate * (1.0 - sig))
    return jnp.stack([d_gate, d_up], axis=-2).astype(gate_up.dtype)


def _grad_kernel(gu_ref, d_ref, out_ref, *, bm, bf):
    rows = pl.ds(pl.program_id(0) * bm, bm)
    cols = pl.ds(pl.program_id(1) * bf, bf)
    gate = gu_ref[rows, 0, cols].astype(jnp.float32)
    up = gu_ref[rows, 1, cols].astype(jnp.float32)
    d_out = d_ref[rows, cols].astype(jnp.float32)
    sig = 1.0 / (1.0 + jnp.exp(-gate))
    out_ref[rows, 0, cols] = (d_out * up * sig * (1.0 + gate * (1.0 - sig))).astype(out_ref.dtype)
    out_ref[rows, 1, cols] = (d_out * gate * sig).astype(out_ref.dtype)


def swiglu_grad_pallas_gpu(gate_up, d_out, *, interpret: bool = False):
    """The reference's gradient as a Pallas (Triton) kernel; `interpret` runs it on any backend (tests)."""
    require_gpu("pallas_gpu", interpret)
    if gate_up.dtype not in (jnp.float32, jnp.bfloat16) or d_out.dtype != gate_up.dtype:
        raise Unsupported(f"dtypes gate_up {gate_up.dtype}, d_out {d_out.dtype} (float32 or bfloat16, both the same)")
    *lead, two, F = gate_up.shape
    N = math.prod(lead)
    bm, bf = largest_pow2_divisor(N, 8), largest_pow2_divisor(F, 512)
    if bf < 16:
        raise Unsupported(f"MLP width {F} has no power-of-two block of at least 16 columns")
    # Row blocks of 8 and column blocks of 512: a program moves 40 KB in bfloat16, small enough for its
    # registers at 4 warps and large enough to keep the memory busy.
    (out,) = poison.pallas_call(
        functools.partial(_grad_kernel, bm=bm, bf=bf),
        out_shapes=[jax.ShapeDtypeStruct((N, two, F), gate_up.dtype)],
        grid=(N // bm, F // bf),
        args=(gate_up.reshape(N, two, F), d_out.reshape(N, F)),
        interpret=interpret,
        name="swiglu_grad_pallas_gpu",
    )
    return out.reshape(gate_up.shape)


# drt_jax.config.MLP_IMPLS lists the same names for model.mlp_impl.
GRADIENT = KernelOp("SwiGLU gradient", {"reference": swiglu_grad_reference, "pallas_gpu": swiglu_grad_pallas_gpu},
                    {"gpu": ("pallas_gpu",)})


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _swiglu(gate_up, impl, kernel_mesh):
    return jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]


def _swiglu_fwd(gate_up, impl, kernel_mesh):
    return _swiglu(gate_up, impl, kernel_mesh), gate_up


def _swiglu_bwd(impl, kernel_mesh, gate_up, d_out):
    return (GRADIENT(impl, (gate_up, d_out.astype(gate_up.dtype)), (_GATE_UP, _OUT), _GATE_UP, kernel_mesh),)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(gate_up, *, impl: str = "auto", kernel_mesh: per_shard.KernelMesh | None = None):
    """gate_up [..., 2, F] -> silu(gate_up[..., 0, :]) * gate_up[..., 1, :] [..., F]; differentiable,
    with the gradient from `impl` (see the module docstring), per shard under a `kernel_mesh`."""
    if gate_up.ndim < 2 or gate_up.shape[-2] != 2:
        raise ValueError(f"swiglu wants gate_up [..., 2, F], got {gate_up.shape}")
    GRADIENT.candidates(impl)
    return _swiglu(gate_up, impl, kernel_mesh)
