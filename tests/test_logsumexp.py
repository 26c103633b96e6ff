"""pallas_kernels.logsumexp: the loss head's log-normaliser over the valid columns of each row, its
Pallas kernel against float64 and the reference (the generic Pallas interpreter on CPU, compiled on a
GPU), and the dispatcher."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp as lse64

from pallas_kernels import logsumexp as lse

ON_GPU = jax.default_backend() == "gpu"


def _logits(shape, dtype, seed):
    """Rows at five scales (0.1 to 100), garbage in the padded columns that must not count."""
    rng = np.random.default_rng(seed)
    scale = np.array([0.1, 1, 5, 30, 100])[np.arange(shape[1]) % 5]
    x = rng.standard_normal(shape) * scale[None, :, None]
    return jnp.asarray(x, jnp.float32).astype(dtype)


def _want(x, valid):
    return lse64(np.asarray(x.astype(jnp.float32), np.float64)[..., :valid], axis=-1)


@pytest.mark.parametrize("shape,valid,dtype", [((3, 5, 3000), 2937, jnp.float32), ((2, 8, 4224), 4100, jnp.bfloat16),
                                               ((1, 7, 256), 256, jnp.float32)])
def test_pallas_gpu_kernel_matches_float64_in_interpret_mode(shape, valid, dtype):
    """Rows a 4-row block does not divide (15, 7), a tail tile the mask cuts short, padded columns
    holding values larger than any valid one, and a width with no padding."""
    x = _logits(shape, dtype, 0)
    if valid < shape[-1]:
        x = x.at[..., valid:].set(1000.0)
    got = lse.logsumexp_pallas_gpu(x, valid, interpret=True)
    assert got.shape == shape[:-1] and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), _want(x, valid), rtol=3e-6, atol=3e-6)
    np.testing.assert_allclose(np.asarray(lse.logsumexp_reference(x, valid)), _want(x, valid), rtol=3e-6, atol=3e-6)


@pytest.mark.skipif(not ON_GPU, reason="the compiled Pallas kernel needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_gpu_kernel_matches_float64_on_gpu(dtype):
    x = _logits((4, 1024, 50304), dtype, 1).at[..., 50265:].set(1000.0)
    got = jax.jit(lambda x: lse.logsumexp_pallas_gpu(x, 50265))(x)
    np.testing.assert_allclose(np.asarray(got), _want(x, 50265), rtol=3e-6, atol=3e-6)
    assert lse.LOG_NORMALISER.choose("auto", x, valid=50265)[0] == "pallas_gpu"


def test_a_kernel_that_cannot_run_says_why_and_the_reference_takes_the_call(caplog, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    x = _logits((2, 5, 300), jnp.float32, 2)
    assert lse.LOG_NORMALISER.choose("pallas_gpu", x, valid=290) == (
        "reference", ["pallas_gpu: pallas_gpu needs a CUDA GPU (backend is cpu)"])
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.dispatch"):
        got = lse.row_logsumexp(x, 290, impl="pallas_gpu")
    assert "log-normaliser impl 'pallas_gpu' skipped: pallas_gpu needs a CUDA GPU" in caplog.text
    np.testing.assert_allclose(np.asarray(got), _want(x, 290), rtol=3e-6, atol=3e-6)
    with pytest.raises(ValueError, match="unknown log-normaliser impl 'fast'"):
        lse.row_logsumexp(x, 290, impl="fast")


def test_the_config_names_the_log_normaliser_and_refuses_an_unknown_one():
    from drt_jax.config import LSE_IMPLS, ConfigError, ModelConfig

    assert ModelConfig.from_preset("tiny").lse_impl == "auto"
    assert set(LSE_IMPLS) == {"auto", *lse.LOG_NORMALISER.impls}
    with pytest.raises(ConfigError, match=r"lse_impl='fast' is not one of \('auto', 'reference', 'pallas_gpu'\)"):
        ModelConfig.from_preset("tiny").replace(lse_impl="fast")


def _grad_inputs(shape, valid, dtype, seed):
    """Logits with garbage in the padded columns, targets anywhere in [0, valid) (the last valid column
    included), weights of 0, 1 and larger."""
    x = _logits(shape, dtype, seed)
    if valid < shape[-1]:
        x = x.at[..., valid:].set(1000.0)
    rng = np.random.default_rng(seed + 1)
    t = rng.integers(0, valid, shape[:-1])
    t.flat[0] = valid - 1
    w = rng.choice([0.0, 1.0, 2.5], shape[:-1])
    return x, jnp.asarray(t, jnp.int32), jnp.asarray(w, jnp.float32)


def _want_grad(x, t, w, valid):
    """float64: (softmax over the valid columns - one hot) x weight, zeros on the padding."""
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    lse = lse64(x64[..., :valid], axis=-1)
    p = np.exp(x64[..., :valid] - lse[..., None])
    p -= np.arange(valid) == np.asarray(t)[..., None]
    d = np.zeros(x.shape)
    d[..., :valid] = p * np.asarray(w)[..., None]
    return lse, d


def test_the_gradient_reference_is_autodiffs_gradient_of_the_weighted_loss():
    x, t, w = _grad_inputs((2, 5, 300), 290, jnp.float32, 3)

    def loss(x):
        v = x[..., :290]
        return jnp.sum(w * (jax.nn.logsumexp(v, axis=-1) - jnp.take_along_axis(v, t[..., None], axis=-1)[..., 0]))

    got_lse, got = lse.softmax_grad_reference(x, t, w, 290, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.grad(loss)(x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_lse), _want(x, 290), rtol=3e-6, atol=3e-6)


@pytest.mark.parametrize("shape,valid,dtype,out_dtype,tiling", [
    ((3, 5, 3000), 2937, jnp.float32, jnp.float32, lse.Tiling()),
    ((2, 8, 4224), 4100, jnp.bfloat16, jnp.bfloat16, lse.Tiling()),
    ((2, 8, 4224), 4100, jnp.bfloat16, jnp.float32, lse.Tiling(rows=1, tile_bytes=1024)),
    ((1, 7, 256), 256, jnp.float32, jnp.bfloat16, lse.Tiling(rows=2, tile_bytes=256)),
    ((1, 7, 640), 300, jnp.float32, jnp.float32, lse.Tiling(tile_bytes=512)),
    ((4, 6, 384), 300, jnp.bfloat16, jnp.bfloat16, lse.Tiling(rows=2, tile_bytes=256, programs=4)),
    ((3, 8, 384), 384, jnp.float32, jnp.float32, lse.Tiling(rows=1, tile_bytes=512, programs=8))])
def test_gradient_kernel_matches_float64_in_interpret_mode(shape, valid, dtype, out_dtype, tiling, monkeypatch):
    """Rows a block does not divide, programs that each walk several row blocks, tails the masks cut short (the log-normaliser's at `valid`, the
    gradient's store at the padded width), padding wider than a tile, garbage in the padded columns that must come out as zeros,
    and outputs poisoned with NaN so that an element the kernel does not write shows."""
    from pallas_kernels import poison

    monkeypatch.setattr(poison, "POISON_OUTPUTS", True)
    x, t, w = _grad_inputs(shape, valid, dtype, 4)
    got_lse, got = lse.softmax_grad_pallas_gpu(x, t, w, valid, out_dtype, interpret=True, tiling=tiling)
    assert got.shape == x.shape and got.dtype == out_dtype and got_lse.dtype == jnp.float32
    want_lse, want = _want_grad(x, t, w, valid)
    np.testing.assert_allclose(np.asarray(got_lse), want_lse, rtol=3e-6, atol=3e-6)
    tol = 1e-2 if out_dtype == jnp.bfloat16 else 1e-4  # bfloat16 keeps 8 significant bits
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=tol, atol=tol * 1e-2)
    assert not np.any(np.asarray(got[..., valid:].astype(jnp.float32)))
    ref_lse, ref = lse.softmax_grad_reference(x, t, w, valid, out_dtype)
    np.testing.assert_allclose(np.asarray(ref.astype(jnp.float32)), want, rtol=tol, atol=tol * 1e-2)


@pytest.mark.skipif(not ON_GPU, reason="the compiled Pallas kernel needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradient_kernel_matches_float64_on_gpu(dtype):
    x, t, w = _grad_inputs((4, 1024, 50304), 50265, dtype, 5)
    got_lse, got = jax.jit(lambda x, t, w: lse.softmax_grad_pallas_gpu(x, t, w, 50265, dtype))(x, t, w)
    want_lse, want = _want_grad(x, t, w, 50265)
    np.testing.assert_allclose(np.asarray(got_lse), want_lse, rtol=3e-6, atol=3e-6)
    # float32: a logit of 400 puts lse's rounding (3e-5) into every probability's exponent
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-4
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=tol, atol=tol * 1e-2)
    assert lse.SOFTMAX_GRADIENT.choose("auto", x, t, w, valid=50265, out_dtype=dtype)[0] == "pallas_gpu"
