"""The GCA reference against a naive per-chunk loop in float64."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gca_reference, grouped_cross_attention


def naive_gca(q, k_mem, v_mem, indices, weights, off_by_one, scale):
    B, C, Sq, H, D = q.shape
    Hkv = k_mem.shape[3]
    out = np.zeros(q.shape)
    for b, c, h in itertools.product(range(B), range(C), range(H)):
        hk = h // (H // Hkv)
        for j, w in zip(indices[b, c], weights[b, c], strict=True):
            if j < 0:
                continue
            logits = scale * q[b, c, :, h] @ k_mem[b, j, :, hk].T  # [Sq, Sm]
            e = np.exp(logits - logits.max(-1, keepdims=True))
            denom = e.sum(-1, keepdims=True)
            if off_by_one:
                denom = denom + np.exp(-logits.max(-1, keepdims=True))
            out[b, c, :, h] += w * (e / denom) @ v_mem[b, j, :, hk]
    return out


def random_inputs(seed, B=2, C=4, Sq=5, Sm=3, H=4, Hkv=2, D=8, M=6, K=3, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, C, Sq, H, D)) * 2
    k_mem = rng.normal(size=(B, M, Sm, Hkv, D)) * 2
    v_mem = rng.normal(size=(B, M, Sm, Hkv, D))
    indices = rng.integers(0, M, size=(B, C, K)).astype(np.int32)
    indices[rng.random(size=(B, C, K)) < 0.3] = -1  # empty slots
    indices[0, 0] = -1  # a chunk with nothing retrieved
    weights = rng.random(size=(B, C, K))
    return [x.astype(dtype) if x.dtype != np.int32 else x for x in (q, k_mem, v_mem, indices, weights)]


@pytest.mark.parametrize("off_by_one", [True, False])
@pytest.mark.parametrize("shape", [dict(), dict(Sq=3, Sm=7, H=6, Hkv=3), dict(H=4, Hkv=4, K=1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_equals_naive_loop_in_float64(off_by_one, shape, seed):
    with jax.enable_x64(True):
        args = random_inputs(seed, **shape)
        scale = 0.3
        expected = naive_gca(*args, off_by_one, scale)
        got = gca_reference(*map(jnp.asarray, args), softmax_off_by_one=off_by_one, scale=scale)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(np.asarray(got)[0, 0], 0.0)


def test_gradients_and_empty_slots():
    with jax.enable_x64(True):
        q, k_mem, v_mem, indices, weights = map(jnp.asarray, random_inputs(3))
        cot = jnp.asarray(np.random.default_rng(9).normal(size=q.shape))
        f = lambda q, k, v, w: jnp.sum(gca_reference(q, k, v, indices, w) * cot)
        dq, dk, dv, dw = jax.grad(f, argnums=(0, 1, 2, 3))(q, k_mem, v_mem, weights)
        assert np.all(np.asarray(dw)[np.asarray(indices) < 0] == 0.0)
        # dweights[c, j] = <dout, O_j>: check one entry against a single-slot evaluation.
        b, c = 1, 2
        j = int(np.argmax(np.asarray(indices)[b, c] >= 0))
        one = jnp.zeros_like(weights).at[b, c, j].set(1.0)
        o_j = gca_reference(q, k_mem, v_mem, indices, one)
        np.testing.assert_allclose(dw[b, c, j], jnp.sum(o_j[b, c] * cot[b, c]), rtol=1e-10)
        # Numerical check of dk in one direction.
        direction = jnp.asarray(np.random.default_rng(10).normal(size=k_mem.shape))
        eps = 1e-6
        fd = (f(q, k_mem + eps * direction, v_mem, weights) - f(q, k_mem - eps * direction, v_mem, weights)) / (2 * eps)
        np.testing.assert_allclose(jnp.sum(dk * direction), fd, rtol=1e-6)
        assert np.abs(np.asarray(dq)).sum() > 0 and np.abs(np.asarray(dv)).sum() > 0


def test_dispatcher_rejects_bad_shapes_with_one_line():
    q, k_mem, v_mem, indices, weights = map(jnp.asarray, random_inputs(0, dtype=np.float32))
    with pytest.raises(ValueError) as err:
        grouped_cross_attention(q, k_mem[..., :1, :], v_mem[..., :1, :], indices, weights[:, :, :2])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown GCA impl"):
        grouped_cross_attention(q, k_mem, v_mem, indices, weights, impl="magic")
    out = grouped_cross_attention(q, k_mem, v_mem, indices, weights, impl="reference")
    np.testing.assert_allclose(out, gca_reference(q, k_mem, v_mem, indices, weights), rtol=1e-6)
