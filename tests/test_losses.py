import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax.losses import auto_block_size, blocked_cross_entropy, cross_entropy, next_token_targets


def test_targets_shift_and_mask_padding():
    tokens = jnp.array([[5, 6, 7, 0, 0], [1, 2, 3, 4, -100]])
    targets, mask = next_token_targets(tokens, pad_id=0)
    np.testing.assert_array_equal(targets, [[6, 7, 0, 0, 0], [2, 3, 4, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])


def test_blocked_cross_entropy_equals_full_logits_value_and_grads():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    hidden = jax.random.normal(keys[0], (2, 37, 16))
    emb = jax.random.normal(keys[1], (50, 16))
    tokens = jax.random.randint(keys[2], (2, 37), 1, 50)
    targets, mask = next_token_targets(tokens, pad_id=0)
    full = lambda h, e: cross_entropy(jnp.einsum("btd,vd->btv", h, e), targets, mask)[0]
    blocked = lambda h, e: blocked_cross_entropy(h, e, targets, mask, block_size=8)[0]
    np.testing.assert_allclose(full(hidden, emb), blocked(hidden, emb), rtol=1e-5)
    g_full = jax.grad(full, argnums=(0, 1))(hidden, emb)
    g_blocked = jax.grad(blocked, argnums=(0, 1))(hidden, emb)
    for a, b in zip(g_full, g_blocked, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _ce_inputs(dtype, B=2, T=45, d=24, V=61):
    keys = jax.random.split(jax.random.PRNGKey(7), 4)
    hidden = jax.random.normal(keys[0], (B, T, d)).astype(dtype)
    emb = 0.3 * jax.random.normal(keys[1], (V, d))
    targets = jax.random.randint(keys[2], (B, T), 0, V)
    weights = (jax.random.uniform(keys[3], (B, T)) > 0.3) * 3.0  # weighted tokens, some left out
    return hidden, emb, targets, weights


def _full_loss(h, e, targets, weights):
    logits = jnp.einsum("btd,vd->btv", h.astype(jnp.float32), e, precision="highest")
    token = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token * weights) / jnp.sum(weights)


def test_blocked_cross_entropy_gradients_with_weights_float32_and_bfloat16():
    """The hand-written gradients of each block (softmax - one_hot, taken in the forward pass) against
    autodiff of the full logits, for hidden states, embedding and token weights: tight in float32,
    within bf16 rounding for bf16 hidden states (whose matmuls it runs in bf16). V = 61 is padded to 64
    inside, so the padded columns' masking is checked too."""
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        hidden, emb, targets, weights = _ce_inputs(dtype)
        blocked = lambda h, e, w, t=targets: blocked_cross_entropy(h, e, t, w, block_size=16)[0]  # noqa: E731
        full = lambda h, e, w, t=targets: _full_loss(h, e, t, w)  # noqa: E731
        with jax.default_matmul_precision("highest"):
            got = jax.grad(blocked, argnums=(0, 1, 2))(hidden, emb, weights)
            want = jax.grad(full, argnums=(0, 1, 2))(hidden.astype(jnp.float32), emb, weights)
        assert got[0].dtype == dtype and got[1].dtype == jnp.float32
        for g, w in zip(got, want, strict=True):
            g = np.asarray(g, np.float64)
            rel = np.linalg.norm(g - np.asarray(w)) / np.linalg.norm(np.asarray(w))
            assert rel < tol, (dtype, rel)


@pytest.mark.parametrize("dtype,logits_dtype", [(jnp.float32, "float32"), (jnp.bfloat16, "bfloat16")])
def test_blocked_cross_entropy_through_the_loss_head_kernels_matches_the_reference(dtype, logits_dtype, monkeypatch):
    """lse_impl="pallas_gpu" (both kernels of the loss head, under the Pallas interpreter, as on a GPU):
    the loss, the metric sums and the gradients of hidden states, embedding and weights equal the
    reference path's (V = 61 padded to 64, tokens left out and weighted)."""
    import functools

    from pallas_kernels import logsumexp as lse

    monkeypatch.setitem(lse.LOG_NORMALISER.impls, "pallas_gpu", functools.partial(lse.logsumexp_pallas_gpu, interpret=True))
    monkeypatch.setitem(lse.SOFTMAX_GRADIENT.impls, "pallas_gpu",
                        functools.partial(lse.softmax_grad_pallas_gpu, interpret=True))
    hidden, emb, targets, weights = _ce_inputs(dtype)
    extra = jnp.stack([weights > 0, weights == 0])

    def run(impl):
        def loss(h, e, w):
            mean, _, sums = blocked_cross_entropy(h, e, targets, w, block_size=16, metric_masks=extra,
                                                  logits_dtype=logits_dtype, lse_impl=impl)
            return mean, sums
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(hidden, emb, weights)

    (k_loss, k_sums), k_grads = run("pallas_gpu")
    (r_loss, r_sums), r_grads = run("reference")
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(k_loss, r_loss, rtol=1e-6)
    np.testing.assert_allclose(k_sums, r_sums, rtol=1e-6)
    for g, w in zip(k_grads, r_grads, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol * 1e-2)


def test_blocked_cross_entropy_backward_runs_three_vocabulary_matmuls_in_the_compute_dtype():
    """With bf16 hidden states, no matmul over the vocabulary's width takes a float32 operand (on GPUs
    such a product runs as a float32 (tf32) GEMM at a fraction of the bf16 rate), the width is padded
    to a multiple of 8 (97 -> 104), and a block's logits are computed once: three such matmuls per block
    (logits, d hidden, d embedding), none recomputed in the backward pass."""
    hidden, emb, targets, weights = _ce_inputs(jnp.bfloat16, V=97)
    grad = jax.grad(lambda h, e: blocked_cross_entropy(h, e, targets, weights, block_size=16)[0], argnums=(0, 1))
    jaxpr = jax.make_jaxpr(grad)(hidden, emb)
    dots = []

    def walk(jpr):
        for eqn in jpr.eqns:
            if eqn.primitive.name == "dot_general":
                dots.append([v.aval for v in eqn.invars])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert not [avals for avals in dots if any(97 in a.shape for a in avals)], dots
    wide = [avals for avals in dots if any(104 in a.shape for a in avals)]
    assert len(wide) == 3, wide
    assert all(a.dtype == jnp.bfloat16 for avals in wide for a in avals), wide


def test_auto_block_size_keeps_a_blocks_float32_logits_within_its_budget():
    assert auto_block_size(1, 16384, 50265) == 4096  # 4096 x 50304 x 4 bytes = 0.77 GiB
    assert auto_block_size(8, 16384, 50265) == 512
    assert auto_block_size(64, 16384, 50265) == 128  # never below 128 tokens
    assert auto_block_size(16, 4096, 259) == 4096  # a small vocabulary: the whole sequence
    assert auto_block_size(1, 1000, 50265) == 1000
    hidden, emb, targets, weights = _ce_inputs(jnp.float32)
    auto = blocked_cross_entropy(hidden, emb, targets, weights)[0]
    np.testing.assert_allclose(auto, blocked_cross_entropy(hidden, emb, targets, weights, block_size=16)[0], rtol=1e-6)


def test_logsumexp_one_pass_matches_float64_with_masked_columns_and_empty_rows():
    """The single-read log-normaliser against float64, on rows of several scales, with -inf columns (the
    padded vocabulary) and a row that is all -inf (the result is -inf, not nan)."""
    from scipy.special import logsumexp as lse64

    from pallas_kernels.logsumexp import logsumexp_one_pass

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 1000)) * np.array([0.1, 1, 5, 30, 100, 1])[:, None]).astype(np.float32)
    x[:, 990:] = -np.inf
    x[5] = -np.inf
    got = np.asarray(jax.jit(logsumexp_one_pass)(jnp.asarray(x)))
    want = lse64(x.astype(np.float64), axis=-1)
    assert got[5] == -np.inf
    np.testing.assert_allclose(got[:5], want[:5], rtol=2e-6, atol=2e-6)


def test_the_target_logit_is_a_dot_with_its_embedding_row_not_a_read_of_the_logits(monkeypatch):
    """The picked logit comes from h . emb[target] (a row gather), not from the block's logits (which XLA
    reads in full to pick from): shifting every logit by 5 moves the log-normaliser by 5 and leaves the
    picked term alone, so each token's loss moves by exactly 5."""
    import drt_jax.losses as losses

    key_h, key_e, key_t = jax.random.split(jax.random.PRNGKey(4), 3)
    h = jax.random.normal(key_h, (2, 8, 16), jnp.float32)
    emb = jax.random.normal(key_e, (40, 16), jnp.float32)
    t = jax.random.randint(key_t, (2, 8), 0, 37)
    base = losses._block_loss(h, emb, t, 37)
    block_logits = losses._block_logits
    monkeypatch.setattr(losses, "_block_logits", lambda h, e, dtype: block_logits(h, e, dtype) + 5.0)
    shifted = losses._block_loss(h, emb, t, 37)
    np.testing.assert_allclose(np.asarray(shifted - base), 5.0, rtol=0, atol=1e-4)


def test_bfloat16_logits_store_the_gemm_in_bfloat16_and_match_float32_to_its_rounding():
    """logits_dtype="bfloat16": the head's vocabulary-wide GEMM writes bfloat16 (seen in the jaxpr of the
    loss and of its gradient), and the loss and both gradients stay within bfloat16 rounding of the
    float32 head's; a bad name is refused."""
    B, T, d, V = 2, 96, 32, 300
    kh, ke, kt = jax.random.split(jax.random.PRNGKey(7), 3)
    hidden = jax.random.normal(kh, (B, T, d), jnp.bfloat16)
    embedding = 0.3 * jax.random.normal(ke, (V, d), jnp.float32)
    targets = jax.random.randint(kt, (B, T), 0, V)
    mask = (jax.random.uniform(kt, (B, T)) > 0.2).astype(jnp.float32)

    def loss(h, e, dtype):
        return blocked_cross_entropy(h, e, targets, mask, block_size=32, logits_dtype=dtype)[0]

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    for fn in (loss, grad):
        jaxpr = {dtype: str(jax.make_jaxpr(fn, static_argnums=2)(hidden, embedding, dtype)) for dtype in ("float32", "bfloat16")}
        assert "preferred_element_type=bfloat16" in jaxpr["bfloat16"]
        assert "preferred_element_type=bfloat16" not in jaxpr["float32"]
    (l32, (dh32, de32)), (l16, (dh16, de16)) = grad(hidden, embedding, "float32"), grad(hidden, embedding, "bfloat16")
    assert float(l16) != float(l32)
    np.testing.assert_allclose(float(l16), float(l32), rtol=2e-3)
    for a, b in ((dh16, dh32), (de16, de32)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.03
    with pytest.raises(ValueError, match="logits_dtype='float16'"):
        loss(hidden, embedding, "float16")
