import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax.retrieval import causal_topk, landmark_scores, shift_to_consumers


def _scores(seed, B=2, C=7, M=7):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, C, M)) * 3.0


def test_landmark_scores_scale():
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 16))
    m = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16))
    np.testing.assert_allclose(landmark_scores(q, m), jnp.einsum("bcd,bmd->bcm", q, m) / 4.0, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("k", [1, 3, 9])
def test_never_selects_invisible_and_weights_sum_to_one(seed, noise, k):
    scores = _scores(seed)
    rng = jax.random.PRNGKey(seed + 100) if noise else None
    idx, w = causal_topk(scores, k, gumbel_rng=rng)
    assert idx.shape == (2, 7, k) and w.shape == (2, 7, k) and idx.dtype == jnp.int32
    idx, w = np.asarray(idx), np.asarray(w)
    for c in range(7):
        filled = idx[:, c] >= 0
        assert np.all(idx[:, c][filled] < c), "a chunk retrieved itself or the future"
        assert np.all(w[:, c][~filled] == 0.0)
        assert filled.sum(axis=-1).tolist() == [min(k, c)] * 2
        if c > 0:
            np.testing.assert_allclose(w[:, c].sum(-1), 1.0, rtol=1e-6)
        else:
            assert np.all(w[:, c] == 0.0)  # the first chunk sees nothing: empty, not NaN
        for b in range(2):
            chosen = idx[b, c][idx[b, c] >= 0]
            assert len(set(chosen.tolist())) == len(chosen)


def test_without_noise_picks_the_best_and_weights_are_softmax_of_clean_scores():
    scores = _scores(3)
    idx, w = causal_topk(scores, 3)
    s = np.asarray(scores)
    for c in range(4, 7):
        best = np.argsort(-s[0, c, :c])[:3]
        np.testing.assert_array_equal(np.sort(idx[0, c]), np.sort(best))
        sel = s[0, c, np.asarray(idx[0, c])]
        np.testing.assert_allclose(w[0, c], np.exp(sel) / np.exp(sel).sum(), rtol=1e-5)


def test_gumbel_changes_selection_but_weights_use_clean_scores():
    scores = _scores(4, C=40, M=40)
    idx_a, _ = causal_topk(scores, 4, gumbel_rng=jax.random.PRNGKey(1))
    idx_b, w_b = causal_topk(scores, 4, gumbel_rng=jax.random.PRNGKey(2))
    assert not np.array_equal(idx_a, idx_b)
    c = 30
    sel = np.asarray(scores)[0, c, np.asarray(idx_b[0, c])]
    np.testing.assert_allclose(w_b[0, c], np.exp(sel) / np.exp(sel).sum(), rtol=1e-5)


def test_gumbel_scale_sets_how_far_training_selection_strays_from_the_clean_top_k():
    scores = _scores(5, C=40, M=40) / 3.0  # unit spread, as trained scores of a small model
    clean, _ = causal_topk(scores, 4)
    key = jax.random.PRNGKey(7)

    def overlap(scale):
        idx, _ = causal_topk(scores, 4, gumbel_rng=key, gumbel_scale=scale)
        a, b = np.sort(np.asarray(idx)[:, 20:], -1), np.sort(np.asarray(clean)[:, 20:], -1)
        return np.mean([len(set(x) & set(y)) / 4 for x, y in zip(a.reshape(-1, 4), b.reshape(-1, 4), strict=True)])

    assert overlap(0.0) == 1.0 and overlap(1e-4) == 1.0
    assert 1.0 > overlap(0.3) > overlap(1.0) > overlap(10.0)
    # Whatever the scale, the weights are the softmax of the clean scores of the chosen chunks.
    idx, w = causal_topk(scores, 4, gumbel_rng=key, gumbel_scale=10.0)
    sel = np.asarray(scores)[0, 30, np.asarray(idx[0, 30])]
    np.testing.assert_allclose(w[0, 30], np.exp(sel) / np.exp(sel).sum(), rtol=1e-5)


def test_model_gumbel_scale_reaches_the_selection_and_is_validated():
    from drt_jax.config import ConfigError, ModelConfig
    from drt_jax.model import DRT

    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16 * 16), 0, 250)
    picks = {}
    for scale in (0.0, 1.0):
        cfg = ModelConfig.from_preset("tiny").replace(gumbel_scale=scale)
        model = DRT(cfg)
        params = model.init(jax.random.PRNGKey(1), tokens)["params"]
        run = lambda det, m=model, p=params: m.apply({"params": p}, tokens, deterministic=det, rngs={"gumbel": jax.random.PRNGKey(3)},
                                                   mutable=["intermediates"])[1]["intermediates"]["retrieval_indices_g0"][0]
        picks[scale] = (np.asarray(run(True)), np.asarray(run(False)))
    np.testing.assert_array_equal(*picks[0.0])  # no noise: training selects what evaluation does
    assert not np.array_equal(*picks[1.0])
    for bad in (-0.5, float("nan")):
        with pytest.raises(ConfigError, match="gumbel_scale"):
            ModelConfig.from_preset("tiny").replace(gumbel_scale=bad)


def test_query_offset_counts_global_chunk_ids():
    scores = _scores(5, B=1, C=2, M=10)
    idx, _ = causal_topk(scores, 8, query_offset=8)  # queries are chunks 8 and 9
    assert int(idx[0, 0].max()) <= 7 and int(idx[0, 1].max()) <= 8
    assert (np.asarray(idx) >= 0).all()


def test_gradients_are_finite_for_chunks_that_see_nothing():
    scores = _scores(6)
    g = jax.grad(lambda s: jnp.sum(causal_topk(s, 3)[1] * jnp.arange(3.0)))(scores)
    assert np.isfinite(np.asarray(g)).all()
    assert np.abs(np.asarray(g)[:, 2:]).sum() > 0


def test_shift_to_consumers():
    idx = jnp.arange(6, dtype=jnp.int32).reshape(1, 3, 2)
    w = jnp.ones((1, 3, 2))
    si, sw = shift_to_consumers(idx, w)
    np.testing.assert_array_equal(si[0], [[-1, -1], [0, 1], [2, 3]])
    np.testing.assert_array_equal(sw[0], [[0, 0], [1, 1], [1, 1]])
