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
