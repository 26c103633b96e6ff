"""pallas_kernels.swiglu: the one-pass SwiGLU gradient against autodiff, its Pallas kernel against the
reference (under the generic Pallas interpreter on CPU, compiled on a GPU), and the dispatcher."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax.config import ConfigError, ModelConfig
from pallas_kernels import poison
from pallas_kernels import swiglu as sw

ON_GPU = jax.default_backend() == "gpu"


def _inputs(shape, dtype, seed):
    """gate_up [*shape[:-1], 2, F] of both signs and two scales, d_out [*shape]: fresh random values."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    *lead, F = shape
    gate_up = jax.random.normal(k1, (*lead, 2, F), jnp.float32) * jnp.array([3.0, 0.5])[:, None]
    return gate_up.astype(dtype), jax.random.normal(k2, shape, jnp.float32).astype(dtype)


def _plain(gate_up):
    return jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]


def test_the_reference_gradient_is_the_derivative_of_silu_times_up():
    gate_up, d_out = _inputs((3, 5, 24), jnp.float32, 0)
    want = jax.vjp(_plain, gate_up)[1](d_out)[0]
    np.testing.assert_allclose(sw.swiglu_grad_reference(gate_up, d_out), want, rtol=2e-6, atol=2e-6)
    out, vjp = jax.vjp(lambda gu: sw.swiglu(gu, impl="reference"), gate_up)
    np.testing.assert_array_equal(out, _plain(gate_up))
    np.testing.assert_allclose(vjp(d_out)[0], want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("shape,dtype", [((2, 40, 96), jnp.float32), ((3, 7, 1024), jnp.bfloat16),
                                         ((5, 48), jnp.float32)])
def test_pallas_gpu_kernel_matches_the_reference_in_interpret_mode(shape, dtype, monkeypatch):
    """Odd row counts (block of 1 row), widths of 96 (32-column blocks) and 1,024 (two 512-column
    blocks); the output starts as NaN, so an element the kernel does not write shows."""
    gate_up, d_out = _inputs(shape, dtype, 1)
    monkeypatch.setattr(poison, "POISON_OUTPUTS", True)
    got = sw.swiglu_grad_pallas_gpu(gate_up, d_out, interpret=True)
    want = sw.swiglu_grad_reference(gate_up, d_out)
    assert got.dtype == want.dtype and got.shape == gate_up.shape
    assert not np.isnan(np.asarray(got, np.float32)).any()
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


@pytest.mark.skipif(not ON_GPU, reason="the compiled Pallas kernel needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_gpu_kernel_matches_the_reference_on_gpu(dtype, monkeypatch):
    gate_up, d_out = _inputs((2, 1044, 2048), dtype, 2)
    monkeypatch.setattr(poison, "POISON_OUTPUTS", True)
    got = jax.jit(sw.swiglu_grad_pallas_gpu)(gate_up, d_out)
    want = jax.jit(sw.swiglu_grad_reference)(gate_up, d_out)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
    out, vjp = jax.vjp(lambda gu: sw.swiglu(gu, impl="pallas_gpu"), gate_up)
    np.testing.assert_allclose(np.asarray(vjp(d_out)[0], np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


def test_a_kernel_that_cannot_run_says_why_and_the_reference_takes_the_call(caplog, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    gate_up, d_out = _inputs((2, 3, 64), jnp.float32, 3)
    name, why = sw.GRADIENT.choose("pallas_gpu", gate_up, d_out)
    assert (name, why) == ("reference", ["pallas_gpu: pallas_gpu needs a CUDA GPU (backend is cpu)"])
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.dispatch"):
        grad = jax.vjp(lambda gu: sw.swiglu(gu, impl="pallas_gpu"), gate_up)[1](d_out)[0]
    assert "SwiGLU gradient impl 'pallas_gpu' skipped: pallas_gpu needs a CUDA GPU" in caplog.text
    np.testing.assert_allclose(grad, sw.swiglu_grad_reference(gate_up, d_out), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown SwiGLU gradient impl 'fast'"):
        sw.swiglu(gate_up, impl="fast")
    with pytest.raises(ConfigError, match=r"mlp_impl='fast' is not one of"):
        ModelConfig.from_preset("tiny").replace(mlp_impl="fast")
    from drt_jax.config import MLP_IMPLS

    assert set(MLP_IMPLS) == {"auto", *sw.GRADIENT.impls}
