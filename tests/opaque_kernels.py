"""CPU stand-ins for custom-call kernels: the attention and GCA references, each lowered as a
`custom_partitioning` op whose partitioner refuses every sharding.

That is what a Pallas/Triton custom call or cuDNN attention's partition rule amounts to on a mesh it
cannot take: if XLA is left to partition the op, compilation fails with "custom_partitioner:
Traceback ..." (issue 10's FSDP failure on 2 GPUs). Inside a fully manual shard_map (per-shard
execution) jax lowers the op as its plain body, so the same kernels then run and give the reference's
numbers. `install()` swaps them in for the references (used by subprocess tests only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning


def _refuse(mesh, arg_shapes, result_shape):
    raise NotImplementedError("an opaque kernel cannot be partitioned by XLA; run it per shard")


def _rule(xs, outs) -> str:
    """A Shardy rule that only ties dimension 0 (the batch) across operands and results."""
    side = lambda arrays, tag: ", ".join(" ".join(["b"] + [f"{tag}{i}_{j}" for j in range(1, a.ndim)]) for i, a in enumerate(arrays))
    return f"{side(xs, 'x')} -> {side(outs, 'y')}"


def _call(fn, xs):
    """fn(*xs) as one custom_partitioning op (xs: arrays, all with the batch first)."""
    op = custom_partitioning(lambda *a: fn(*a))
    outs = jax.eval_shape(fn, *xs)
    op.def_partition(partition=_refuse, sharding_rule=_rule(xs, outs if isinstance(outs, tuple) else (outs,)))
    return op(*xs)


def opaque(fn):
    """fn(*arrays) -> array, forward and backward each as one opaque op (a custom_vjp over two of them).

    Integer operands get no cotangent."""

    @jax.custom_vjp
    def f(*xs):
        return _call(fn, xs)

    def fwd(*xs):
        return _call(fn, xs), xs

    def bwd(xs, ct):
        diff = [i for i, x in enumerate(xs) if jnp.issubdtype(x.dtype, jnp.floating)]

        def grads(*args):
            prim, ct = args[:-1], args[-1]

            def of_diff(*d):
                full = list(prim)
                for i, x in zip(diff, d, strict=True):
                    full[i] = x
                return fn(*full)

            return tuple(jax.vjp(of_diff, *(prim[i] for i in diff))[1](ct))

        g = _call(grads, (*xs, ct))
        out = [None] * len(xs)
        for i, gi in zip(diff, g, strict=True):
            out[i] = gi
        return tuple(out)

    f.defvjp(fwd, bwd)
    return f


def install() -> None:
    """Makes the attention, GCA and SwiGLU-gradient "reference" implementations opaque for this process (the
    log-normaliser's reference is left to XLA, as the op leaves it)."""
    from drt_jax import attention
    from pallas_kernels import swiglu
    from pallas_kernels.gca import api
    from pallas_kernels.gca.reference import gca_reference

    plain = attention.attention_reference

    def attention_opaque(q, k, v, *, window, slopes=None, scale=None):
        if slopes is not None:  # slopes carry no batch dimension; the tests use RoPE
            raise NotImplementedError("opaque attention takes no ALiBi slopes")
        return opaque(lambda q, k, v: plain(q, k, v, window=window, scale=scale))(q, k, v)

    def gca_opaque(q, k_mem, v_mem, indices, weights, *, softmax_off_by_one=True, scale=None):
        run = lambda *a: gca_reference(*a, softmax_off_by_one=softmax_off_by_one, scale=scale)
        return opaque(run)(q, k_mem, v_mem, indices, weights)

    attention.attention_reference = attention_opaque
    globals()["gca_opaque"] = gca_opaque
    api.register("reference", __name__, "gca_opaque")
    grad = swiglu.swiglu_grad_reference
    swiglu.GRADIENT.impls["reference"] = lambda gate_up, d_out: _call(grad, (gate_up, d_out))
