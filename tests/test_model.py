"""DRT model: causality, the retriever's gradient, intermediates, baselines, and learning a toy task."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from drt_jax import DRT, ModelConfig
from drt_jax.losses import next_token_loss
from tests.conftest import small_config


def _init(cfg, T=30, B=2, seed=0):
    tokens = jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, 60)
    params = DRT(cfg).init(jax.random.PRNGKey(seed + 1), tokens)["params"]
    return tokens, params


@pytest.mark.parametrize(
    "variant, noise",
    [(dict(), False), (dict(), True), (dict(position="alibi"), False), (dict(gca_residual="standard"), True),
     (dict(arch="swa", decoder_layers=(3,)), False), (dict(arch="full", window=None), False)],
)
def test_causality_across_chunks_with_retrieval(variant, noise):
    cfg = small_config(**variant)
    model = DRT(cfg)
    T = 33  # 9 chunks of 4 tokens, the last one partial

    @jax.jit
    def forward(params, tokens, noisy_key):
        noisy = noisy_key is not None
        rngs = {"gumbel": noisy_key} if noisy else None
        return model.apply({"params": params}, tokens, deterministic=not noisy, rngs=rngs)

    for seed in (0, 1):
        tokens, params = _init(cfg, T=T, seed=seed)
        for noisy_key in [jax.random.PRNGKey(7 + seed)] if noise else [None]:
            base = forward(params, tokens, noisy_key)
            for t in (3, 4, 9, 20, 29, 32):  # chunk boundaries (4, 20) and mid-chunk positions
                other = tokens.at[:, t:].set((tokens[:, t:] + 17) % 60)
                changed = forward(params, other, noisy_key)
                np.testing.assert_allclose(changed[:, :t], base[:, :t], atol=1e-6, rtol=0)
                assert np.abs(np.asarray(changed[:, t:] - base[:, t:])).max() > 1e-4


def test_retrieval_is_active_and_exposed_per_group(cfg):
    tokens, params = _init(cfg, T=40)
    logits, state = DRT(cfg).apply({"params": params}, tokens, mutable=["intermediates"])
    inter = state["intermediates"]
    C = 10
    for g in range(len(cfg.groups)):
        idx = np.asarray(inter[f"retrieval_indices_g{g}"][0])
        w = np.asarray(inter[f"retrieval_weights_g{g}"][0])
        assert idx.shape == w.shape == (2, C, cfg.top_k)
        assert np.all(idx[:, 0] == -1) and np.all(w[:, 0] == 0)
        np.testing.assert_allclose(w[:, 1:].sum(-1), 1.0, rtol=1e-5)
        assert np.all(idx < np.arange(C)[None, :, None])
    # GCA changes the output: a model with its GCA output projections zeroed differs.
    unboxed = nn.unbox(params)
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "gca" in jax.tree_util.keystr(path) and "'o'" in jax.tree_util.keystr(path) else x,
        unboxed,
    )
    other = DRT(cfg).apply({"params": zeroed}, tokens)
    assert np.abs(np.asarray(other - logits)).max() > 1e-4
    # ... but not for the first two chunks, which get no GCA (spec 3.5).
    np.testing.assert_allclose(other[:, : 2 * cfg.chunk_size - 1], logits[:, : 2 * cfg.chunk_size - 1], atol=1e-6)


def test_retriever_gradient_is_nonzero_and_matches_finite_differences():
    with jax.enable_x64(True):
        cfg = small_config(dtype="float64", param_dtype="float64", top_k=2)
        model = DRT(cfg)
        tokens, params = _init(cfg, T=36)
        variables = model.init(jax.random.PRNGKey(1), tokens)
        params, perturb = variables["params"], variables["perturbations"]

        @jax.jit
        def loss(pert):
            logits = model.apply({"params": params, "perturbations": pert}, tokens)
            return next_token_loss(logits, tokens, cfg.pad_id)[0]

        grads = jax.grad(loss)(perturb)
        for g in range(len(cfg.groups)):
            ds = np.asarray(grads[f"retrieval_scores_g{g}"])
            assert np.abs(ds).max() > 1e-8, f"group {g}: retrieval scores get no gradient"
            b, c, j = np.unravel_index(np.argmax(np.abs(ds)), ds.shape)
            assert j < c  # only visible, selected chunks carry gradient
            eps = 1e-4  # central differences: O(eps^2) truncation, far above float64 round-off
            bump = lambda s, g=g, b=b, c=c, j=j: jax.tree_util.tree_map(lambda x: x, perturb) | {
                f"retrieval_scores_g{g}": perturb[f"retrieval_scores_g{g}"].at[b, c, j].add(s)
            }
            fd = (loss(bump(eps)) - loss(bump(-eps))) / (2 * eps)
            np.testing.assert_allclose(ds[b, c, j], fd, rtol=1e-4)


def test_landmark_padding_and_negative_ids():
    cfg = small_config()
    tokens, params = _init(cfg, T=10)
    logits = DRT(cfg).apply({"params": params}, tokens)
    assert logits.shape == (2, 10, cfg.vocab_size)
    ignored = tokens.at[:, 8:].set(-100)  # read as padding, like the authors' collators
    padded = tokens.at[:, 8:].set(cfg.pad_id)
    np.testing.assert_array_equal(
        DRT(cfg).apply({"params": params}, ignored), DRT(cfg).apply({"params": params}, padded)
    )


def test_parameters_carry_logical_axis_names(cfg):
    _, params = _init(cfg)
    specs = nn.get_partition_spec(params)
    assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["group0_layer_0"]["gca"]["q"]["kernel"]) == ("embed", "heads", "head_dim")
    assert tuple(specs["lower_0"]["mlp"]["down"]["kernel"]) == ("mlp", "embed")


def test_dropout_needs_and_uses_its_rng():
    cfg = small_config(dropout_rate=0.5, gumbel_noise=False)
    tokens, params = _init(cfg)
    run = lambda key: DRT(cfg).apply({"params": params}, tokens, deterministic=False, rngs={"dropout": key})
    assert np.abs(np.asarray(run(jax.random.PRNGKey(0)) - run(jax.random.PRNGKey(1)))).max() > 1e-3


def test_tiny_drt_learns_a_passkey_copy_task():
    """Each sequence: a random 4-token passkey, constant filler, then the passkey again at the end.
    The passkey lies far outside the sliding window and the filler is the same in every sequence, so
    the first answer token can only come through retrieval + GCA (nothing else tells sequences apart)."""
    cfg = ModelConfig.from_preset("tiny").replace(d_model=64, n_heads=4, n_kv_heads=2, mlp_dim=128,
                                                   decoder_layers=(1, 1), chunk_size=7, window=8, top_k=2)
    rng = np.random.default_rng(0)
    B, T = 16, 8 * 7
    filler = np.full((B, T), 97)
    key = rng.integers(0, 26, size=(B, 4)) + 65
    filler[:, 1:5] = key
    filler[:, -4:] = key
    tokens = jnp.asarray(filler, jnp.int32)
    model = DRT(cfg)
    params = model.init(jax.random.PRNGKey(0), tokens)["params"]
    opt = optax.adam(3e-3)
    state = opt.init(params)

    def answer_loss(p):
        logits = model.apply({"params": p}, tokens)
        logp = jax.nn.log_softmax(logits[:, -5:-1].astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, -4:, None], axis=-1))

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(lambda p: next_token_loss(model.apply({"params": p}, tokens), tokens, cfg.pad_id)[0] + answer_loss(p))(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    first = float(answer_loss(params))
    for _ in range(150):
        params, state, _ = step(params, state)
    last = float(answer_loss(params))
    print(f"passkey answer loss {first:.3f} -> {last:.3f}")
    assert first > 3.0
    # Chance level for a letter is ln(26) = 3.26 nats; 150 steps bring it to about 0.7 on CPU.
    assert last < 1.5, f"the tiny DRT did not learn to copy the passkey: {first:.3f} -> {last:.3f}"


def test_remat_policies_give_the_same_loss_and_gradients():
    results = []
    for remat in ("none", "full", "dots"):
        cfg = small_config(remat=remat)
        tokens, params = _init(cfg, T=24)
        loss = lambda p, cfg=cfg, tokens=tokens: next_token_loss(DRT(cfg).apply({"params": p}, tokens), tokens, cfg.pad_id)[0]
        results.append(jax.jit(jax.value_and_grad(loss))(params))
    for value, grads in results[1:]:
        np.testing.assert_allclose(value, results[0][0], rtol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(results[0][1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def _scale_gca_outputs(params, factor):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * factor if "gca" in jax.tree_util.keystr(path) and "'o'" in jax.tree_util.keystr(path) else x,
        params,
    )


def test_bfloat16_compute_keeps_float32_params_and_retrieval():
    cfg = small_config(dtype="bfloat16")
    tokens, params = _init(cfg, T=24)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(nn.unbox(params)))
    # At initialisation GCA's output projection is small enough that its share of the logits sits near
    # bf16 rounding; scaled up, a bf16 path that lost retrieval is far outside the tolerance below.
    params = _scale_gca_outputs(nn.unbox(params), 10.0)
    logits, state = DRT(cfg).apply({"params": params}, tokens, mutable=["intermediates"])
    assert logits.dtype == jnp.bfloat16
    assert state["intermediates"]["retrieval_weights_g0"][0].dtype == jnp.float32
    ref = DRT(small_config()).apply({"params": params}, tokens)
    no_gca = DRT(small_config()).apply({"params": _scale_gca_outputs(params, 0.0)}, tokens)
    err = logits.astype(jnp.float32) - ref
    assert float(jnp.abs(err).max()) < 0.01  # bf16 rounding: about 0.003
    # GCA moves the logits about 12x more than bf16 rounding does.
    assert float(jnp.linalg.norm(err)) < 0.25 * float(jnp.linalg.norm(ref - no_gca))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_hot_embedding_equals_the_gather(dtype, monkeypatch):
    """Small vocabularies embed by a one-hot matmul (its gradient is a GEMM, not a scatter-add): the
    same logits as nn.Embed's gather, bit for bit, and the same gradients."""
    import drt_jax.model as model_module

    cfg = small_config(dtype=dtype)
    assert cfg.vocab_size <= model_module.ONE_HOT_EMBED_MAX_VOCAB
    tokens, params = _init(cfg, T=40)
    params = nn.unbox(params)

    def value_and_grad():
        loss = lambda p: next_token_loss(DRT(cfg).apply({"params": p}, tokens).astype(jnp.float32), tokens, cfg.pad_id)[0]  # noqa: E731
        return DRT(cfg).apply({"params": params}, tokens), jax.grad(loss)(params)

    one_hot_logits, one_hot_grads = value_and_grad()
    monkeypatch.setattr(model_module, "ONE_HOT_EMBED_MAX_VOCAB", 0)
    gather_logits, gather_grads = value_and_grad()
    np.testing.assert_array_equal(np.asarray(one_hot_logits, np.float32), np.asarray(gather_logits, np.float32))
    tol = 1e-5 if dtype == "float32" else 2e-2  # bf16: the gather's gradient adds in bf16, the GEMM in f32
    for a, b in zip(jax.tree_util.tree_leaves(one_hot_grads), jax.tree_util.tree_leaves(gather_grads), strict=True):
        assert float(jnp.linalg.norm(a - b)) <= tol * float(jnp.linalg.norm(b)) + 1e-12


def test_embed_tokens_broadcasts_the_landmark_row_as_the_slots_gather_would(monkeypatch):
    """A gathered table embeds tokens and broadcasts the landmark row (its gradient a sum, not C
    scatter-adds into one row): the same slot inputs as embedding the landmark-inserted slots, bit for
    bit, and the same embedding gradient, for a length that leaves the last chunk padded."""
    import drt_jax.model as model_module

    monkeypatch.setattr(model_module, "ONE_HOT_EMBED_MAX_VOCAB", 0)
    cfg = small_config(dtype="float32")
    tokens, params = _init(cfg, T=3 * cfg.chunk_size + 5)
    tokens = tokens.at[0, 2].set(-1)
    params = nn.unbox(params)
    model = DRT(cfg)
    via_tokens = lambda p: model.apply({"params": p}, tokens, method=DRT.embed_tokens)  # noqa: E731
    via_slots = lambda p: model.apply({"params": p}, model.apply({"params": p}, tokens, method=DRT._slots), method=DRT.embed_slots)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(via_tokens(params)), np.asarray(via_slots(params)))
    cot = jax.random.normal(jax.random.PRNGKey(3), via_slots(params).shape)
    grad = lambda f: jax.grad(lambda p: jnp.sum(f(p) * cot))(params)["embed"]["embedding"]  # noqa: E731
    g_tokens, g_slots = grad(via_tokens), grad(via_slots)
    assert float(jnp.abs(g_slots[cfg.landmark_id]).max()) > 0
    np.testing.assert_allclose(np.asarray(g_tokens), np.asarray(g_slots), rtol=1e-5, atol=1e-6)


def test_mlp_keeps_the_parameters_of_two_projections():
    """The MLP's stacked gate/up GEMM keeps the parameters separate projections had (mlp/gate/kernel,
    mlp/up/kernel, their initial values and logical axes), so checkpoints written before it load; and it
    computes what the two projections compute."""
    from drt_jax.layers import MLP, dense

    cfg = small_config()

    class TwoProjections(nn.Module):
        @nn.compact
        def __call__(self, x):
            gate = dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "gate")(x)
            up = dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "up")(x)
            return dense(cfg, cfg.d_model, ("mlp", "embed"), "down")(nn.silu(gate) * up)

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, cfg.d_model), jnp.float32)
    old = TwoProjections().init(jax.random.PRNGKey(0), x)
    new = MLP(cfg).init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(old) == jax.tree.structure(new)
    for a, b in zip(jax.tree.leaves(old, is_leaf=lambda v: isinstance(v, nn.Partitioned)),
                    jax.tree.leaves(new, is_leaf=lambda v: isinstance(v, nn.Partitioned)), strict=True):
        assert a.names == b.names
        np.testing.assert_array_equal(a.value, b.value)
    np.testing.assert_allclose(MLP(cfg).apply(old, x), TwoProjections().apply(old, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_fused_qkv_keeps_the_parameters_and_computes_the_three_projections(n_kv_heads):
    """model.fuse_qkv stacks the q, k and v kernels into one GEMM at call time: the parameters (paths,
    initial values, logical axes) and the layer's output are the separate projections', with grouped-query
    attention and without."""
    from drt_jax.layers import SelfAttention

    cfg = small_config(n_kv_heads=n_kv_heads, gumbel_noise=False)
    fused = cfg.replace(fuse_qkv=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, cfg.d_model), jnp.float32)
    attn = SelfAttention(cfg)
    old = attn.init(jax.random.PRNGKey(0), x, jnp.arange(7))
    new = SelfAttention(fused).init(jax.random.PRNGKey(0), x, jnp.arange(7))
    boxed = lambda v: isinstance(v, nn.Partitioned)  # noqa: E731
    for a, b in zip(jax.tree.leaves(old, is_leaf=boxed), jax.tree.leaves(new, is_leaf=boxed), strict=True):
        assert a.names == b.names
        np.testing.assert_array_equal(a.value, b.value)
    np.testing.assert_allclose(SelfAttention(fused).apply(old, x, jnp.arange(7)), attn.apply(old, x, jnp.arange(7)),
                               rtol=1e-5, atol=1e-6)


def test_fused_qkv_gives_a_drt_the_same_loss_and_gradients():
    """A DRT with grouped-query attention, with and without model.fuse_qkv: the same loss and gradients."""
    cfg = small_config(gumbel_noise=False)
    fused = cfg.replace(fuse_qkv=True)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 4 * cfg.slots_per_chunk), 0, cfg.vocab_size)
    params = DRT(cfg).init(jax.random.PRNGKey(3), tokens)["params"]

    def loss(c, p):
        return jnp.mean(DRT(c).apply({"params": p}, tokens) ** 2)

    (l_new, g_new), (l_old, g_old) = (jax.jit(jax.value_and_grad(functools.partial(loss, c)))(params) for c in (fused, cfg))
    np.testing.assert_allclose(l_new, l_old, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_old), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
