"""Output poisoning for kernel tests, shared by every Pallas and Triton kernel of this package.

Tests set POISON_OUTPUTS: a kernel then writes into NaN-filled output buffers (-1 for integers),
aliased in place, so an element it forgets to write shows up as NaN instead of as stale or zero memory.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl

POISON_OUTPUTS = False


def filled_outputs(out_shapes) -> tuple:
    """One poisoned buffer per output shape (jax.ShapeDtypeStruct)."""
    return tuple(jnp.full(s.shape, jnp.nan if jnp.issubdtype(s.dtype, jnp.floating) else -1, s.dtype) for s in out_shapes)


def pallas_call(kernel, *, out_shapes, grid, args, interpret: bool, name: str, compiler_params=None):
    """pl.pallas_call(kernel, ...)(*args) over whole-array refs (kernel(*in_refs, *out_refs)); with
    POISON_OUTPUTS the outputs start as poisoned buffers."""
    n_in, n_out = len(args), len(out_shapes)
    if POISON_OUTPUTS:
        aliases = {n_in + i: i for i in range(n_out)}

        def body(*refs):
            kernel(*refs[:n_in], *refs[n_in + n_out:])

        args = (*args, *filled_outputs(out_shapes))
    else:
        aliases, body = {}, kernel
    return pl.pallas_call(body, out_shape=tuple(out_shapes), grid=grid, input_output_aliases=aliases,
                          interpret=interpret, compiler_params=compiler_params, name=name)(*args)
