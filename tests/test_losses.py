import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.losses import blocked_cross_entropy, cross_entropy, next_token_targets


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
