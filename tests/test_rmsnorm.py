"""pallas_kernels.rmsnorm: RMSNorm with the residual add before it, its kernels against the reference
(under the generic Pallas interpreter on CPU, compiled on a GPU), the one-pass gradient against
autodiff, and the layers' use of it."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax.config import ConfigError, ModelConfig
from pallas_kernels import poison
from pallas_kernels import rmsnorm as rn

ON_GPU = jax.default_backend() == "gpu"
EPS = 1e-5


def _inputs(shape, dtype, seed):
    """x, residual [*shape] at different scales, gain [d] near 1, d y and d s: fresh random values."""
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = (jax.random.normal(k[0], shape) * 2.0).astype(dtype)
    r = (jax.random.normal(k[1], shape) * 0.5).astype(dtype)
    gain = 1.0 + 0.2 * jax.random.normal(k[2], shape[-1:])
    return x, r, gain, jax.random.normal(k[3], shape).astype(dtype), jax.random.normal(k[4], shape).astype(dtype)


def _plain(x, r, gain, out_dtype):
    """The unfused layer code: a bfloat16 residual add, then the norm in float32."""
    s = x if r is None else x + r
    s32 = s.astype(jnp.float32)
    y = s32 * jax.lax.rsqrt(jnp.mean(s32 * s32, axis=-1, keepdims=True) + EPS)
    return s, (y * gain).astype(out_dtype)


def _interpret_kernels(monkeypatch):
    """impl="pallas_gpu" reaches both kernels under the Pallas interpreter, as on a GPU."""
    monkeypatch.setitem(rn.FORWARD.impls, "pallas_gpu", functools.partial(rn.rms_norm_fwd_pallas_gpu, interpret=True))
    monkeypatch.setitem(rn.GRADIENT.impls, "pallas_gpu", functools.partial(rn.rms_norm_bwd_pallas_gpu, interpret=True))


def _close(got, want, tol):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


def test_the_reference_is_the_layer_code_and_its_gradient_is_autodiffs():
    x, r, gain, dy, ds = _inputs((2, 7, 48), jnp.float32, 0)
    s, y = rn.rms_norm(x, gain, residual=r, eps=EPS, impl="reference")
    want_s, want_y = _plain(x, r, gain, jnp.float32)
    np.testing.assert_array_equal(s, want_s)
    np.testing.assert_array_equal(y, want_y)
    dx, dg = rn.rms_norm_bwd_reference(s, gain, dy, ds, eps=EPS)
    _, vjp = jax.vjp(lambda x, r, g: _plain(x, r, g, jnp.float32), x, r, gain)
    want_dx, want_dr, want_dg = vjp((ds, dy))
    _close(dx, want_dx, 1e-5)
    _close(dx, want_dr, 1e-5)
    _close(dg.sum(0), want_dg, 1e-5)


@pytest.mark.parametrize("shape,dtype,residual", [((2, 40, 96), jnp.float32, True), ((3, 7, 768), jnp.bfloat16, True),
                                                  ((5, 48), jnp.float32, False), ((2, 64, 80), jnp.bfloat16, False)])
def test_pallas_gpu_kernels_match_the_reference_in_interpret_mode(shape, dtype, residual, monkeypatch):
    """Widths that are not powers of two (masked columns), odd row counts (blocks of one row), 64 rows
    of 4 (a program walks 16 blocks); outputs start as NaN, so an element a kernel does not write shows."""
    x, r, gain, dy, ds = _inputs(shape, dtype, 1)
    r, ds = (r, ds) if residual else (None, None)
    monkeypatch.setattr(poison, "POISON_OUTPUTS", True)
    s, y = rn.rms_norm_fwd_pallas_gpu(x, r, gain, eps=EPS, out_dtype=dtype, interpret=True)
    want_s, want_y = rn.rms_norm_reference(x, r, gain, eps=EPS, out_dtype=dtype)
    tol = 2e-6 if dtype == jnp.float32 else 1e-2
    assert s.dtype == x.dtype and y.dtype == dtype and not np.isnan(np.asarray(y, np.float32)).any()
    _close(s, want_s, 0)
    _close(y, want_y, tol)
    dx, dg = rn.rms_norm_bwd_pallas_gpu(s, gain, dy, ds, eps=EPS, interpret=True)
    want_dx, want_dg = rn.rms_norm_bwd_reference(s, gain, dy, ds, eps=EPS)
    assert dx.dtype == x.dtype and not np.isnan(np.asarray(dx, np.float32)).any() and not np.isnan(dg).any()
    _close(dx, want_dx, 1e-5 if dtype == jnp.float32 else 3e-2)
    _close(dg.sum(0), want_dg.sum(0), 1e-4 if dtype == jnp.float32 else 5e-2)


def test_the_kernel_path_differentiates_like_the_reference(monkeypatch):
    """rms_norm with impl="pallas_gpu" goes through the custom gradient (the kernels under the
    interpreter): output and the three gradients, with and without the residual."""
    _interpret_kernels(monkeypatch)
    x, r, gain, dy, ds = _inputs((2, 12, 96), jnp.float32, 2)

    def loss(impl, x, r, g):
        s, y = rn.rms_norm(x, g, residual=r, eps=EPS, impl=impl)
        return jnp.sum(s * ds) + jnp.sum(y * dy) + jnp.sum(rn.rms_norm(s, g, eps=EPS, impl=impl) ** 2)

    got = jax.value_and_grad(functools.partial(loss, "pallas_gpu"), argnums=(0, 1, 2))(x, r, gain)
    want = jax.value_and_grad(functools.partial(loss, "reference"), argnums=(0, 1, 2))(x, r, gain)
    _close(got[0], want[0], 1e-5)
    for g, w in zip(got[1], want[1], strict=True):
        _close(g, w, 1e-5)


@pytest.mark.parametrize("residual", [True, False])
def test_copies_of_the_norm_have_their_gradients_summed_in_the_backward_kernel(residual, monkeypatch):
    """copies=3 (self-attention's q, k, v readers): three arrays equal to the one norm, and the gradient
    of a loss that reads each copy differently (one copy not at all, a symbolic zero) equals the
    reference's; the backward kernel, poisoned, reads two d y (the third left out) in one call."""
    _interpret_kernels(monkeypatch)
    monkeypatch.setattr(poison, "POISON_OUTPUTS", True)
    x, r, gain, dy, ds = _inputs((2, 12, 96), jnp.bfloat16, 5)
    dy2 = jnp.flip(dy, axis=1)
    calls = []
    bwd = rn.GRADIENT.impls["pallas_gpu"]
    monkeypatch.setitem(rn.GRADIENT.impls, "pallas_gpu", lambda *a, **k: calls.append(len(a)) or bwd(*a, **k))

    def loss(impl, x, r, g):
        out = rn.rms_norm(x, g, residual=r if residual else None, eps=EPS, impl=impl, copies=3)
        s, (y1, y2, y3) = out if residual else (None, out)
        assert y1 is y2 is y3 or impl == "pallas_gpu"
        extra = jnp.sum(s.astype(jnp.float32) * ds) if residual else 0.0
        return jnp.sum(y1.astype(jnp.float32) * dy) + jnp.sum(y3.astype(jnp.float32) * dy2) + extra

    got = jax.value_and_grad(functools.partial(loss, "pallas_gpu"), argnums=(0, 1, 2) if residual else (0, 2))(x, r, gain)
    want = jax.value_and_grad(functools.partial(loss, "reference"), argnums=(0, 1, 2) if residual else (0, 2))(x, r, gain)
    assert calls == [5]  # s, gain, d y, d s (or None), the second d y
    _close(got[0], want[0], 1e-2)
    for g, w in zip(got[1], want[1], strict=True):
        assert not np.isnan(np.asarray(g, np.float32)).any()
        _close(g, w, 3e-2)
    dx, dg = rn.rms_norm_bwd_reference(x, gain, dy, None, dy2, eps=EPS)
    want_dx, want_dg = rn.rms_norm_bwd_reference(x, gain, dy.astype(jnp.float32) + dy2, None, eps=EPS)
    _close(dx, want_dx, 0)
    _close(dg, want_dg, 0)


@pytest.mark.skipif(not ON_GPU, reason="the compiled Pallas kernels need a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("residual", [True, False])
def test_pallas_gpu_kernels_match_the_reference_on_gpu(dtype, residual, monkeypatch):
    x, r, gain, dy, ds = _inputs((2, 1044, 768), dtype, 3)
    monkeypatch.setattr(poison, "POISON_OUTPUTS", True)
    tol = 2e-5 if dtype == jnp.float32 else 2e-2

    def both(impl, x, r, g):
        if not residual:
            y, vjp = jax.vjp(lambda x, g: rn.rms_norm(x, g, eps=EPS, impl=impl), x, g)
            return y, *vjp(dy)
        (s, y), vjp = jax.vjp(lambda x, r, g: rn.rms_norm(x, g, residual=r, eps=EPS, impl=impl), x, r, g)
        return s, y, *vjp((ds, dy))

    got = jax.jit(functools.partial(both, "pallas_gpu"))(x, r, gain)
    want = jax.jit(functools.partial(both, "reference"))(x, r, gain)
    names = ("s", "y", "dx", "dr", "dgain") if residual else ("y", "dx", "dgain")
    for name, g, w in zip(names, got, want, strict=True):
        assert not np.isnan(np.asarray(g, np.float32)).any(), name
        _close(g, w, tol if name != "dgain" else 50 * tol)
    assert rn.FORWARD.choose("auto", x, r, gain, eps=EPS, out_dtype=dtype)[0] == "pallas_gpu"


def test_a_kernel_that_cannot_run_says_why_and_the_reference_takes_the_call(caplog, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    x, r, gain, dy, ds = _inputs((2, 3, 64), jnp.float32, 4)
    assert rn.FORWARD.choose("pallas_gpu", x, r, gain, eps=EPS, out_dtype=jnp.float32) == (
        "reference", ["pallas_gpu: pallas_gpu needs a CUDA GPU (backend is cpu)"])
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.dispatch"):
        s, y = rn.rms_norm(x, gain, residual=r, eps=EPS, impl="pallas_gpu")
    assert "RMSNorm impl 'pallas_gpu' skipped: pallas_gpu needs a CUDA GPU" in caplog.text
    _close(y, _plain(x, r, gain, jnp.float32)[1], 1e-6)
    with pytest.raises(ValueError, match=r"residual bfloat16\[2, 3, 64\] does not match x float32\[2, 3, 64\]"):
        rn.rms_norm(x, gain, residual=r.astype(jnp.bfloat16), eps=EPS)
    with pytest.raises(ValueError, match="unknown RMSNorm impl 'fast'"):
        rn.rms_norm(x, gain, eps=EPS, impl="fast")
    with pytest.raises(ConfigError, match=r"norm_impl='fast' is not one of"):
        ModelConfig.from_preset("tiny").replace(norm_impl="fast")
    from drt_jax.config import NORM_IMPLS

    assert set(NORM_IMPLS) == {"auto", *rn.FORWARD.impls} == {"auto", *rn.GRADIENT.impls}


def test_the_layers_fused_norms_keep_the_parameters_and_the_outputs(monkeypatch):
    """A DRT with every norm through the kernels (interpreted) gives the reference's logits and gradients,
    with the same parameter tree."""
    from drt_jax.model import DRT

    cfg = ModelConfig.from_preset("tiny").replace(gumbel_noise=False)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (1, cfg.slots_per_chunk * 4), 0, cfg.vocab_size)
    params = DRT(cfg).init(jax.random.PRNGKey(6), tokens)["params"]
    _interpret_kernels(monkeypatch)
    kernel_cfg = cfg.replace(norm_impl="pallas_gpu")
    assert jax.tree.structure(DRT(kernel_cfg).init(jax.random.PRNGKey(6), tokens)["params"]) == jax.tree.structure(params)

    def loss(c, p):
        return jnp.mean(DRT(c).apply({"params": p}, tokens) ** 2)

    got, got_grad = jax.value_and_grad(functools.partial(loss, kernel_cfg))(params)
    want, want_grad = jax.value_and_grad(functools.partial(loss, cfg))(params)
    _close(got, want, 1e-5)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        _close(g, w, 2e-5)


def test_each_layers_last_residual_add_runs_inside_the_next_norm(monkeypatch):
    """A layer hands its output on with the last add pending (layers.Stream), so only the norms that
    start a stage read a plain array: the first lower layer's (the embedding), the encoder's input norm
    and its first layer's, and each group's first layer's (the groups' retrieval reads the sum itself).
    Every other norm, the final norms included, takes the add into its kernel."""
    from drt_jax.model import DRT

    cfg = ModelConfig.from_preset("tiny").replace(gumbel_noise=False)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (1, cfg.slots_per_chunk * 4), 0, cfg.vocab_size)
    params = DRT(cfg).init(jax.random.PRNGKey(6), tokens)["params"]
    calls = []

    def recording(x, residual, gain, **kw):
        calls.append(residual is not None)
        return rn.rms_norm_reference(x, residual, gain, **kw)

    monkeypatch.setitem(rn.FORWARD.impls, "pallas_gpu", recording)
    DRT(cfg.replace(norm_impl="pallas_gpu")).apply({"params": params}, tokens)
    groups = len(cfg.groups)
    norms = 2 * cfg.n_lower + (2 + 2 * cfg.encoder_layers) + 3 * sum(cfg.groups) + 1
    assert len(calls) == norms
    assert calls.count(False) == 3 + groups, calls


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_each_attention_norms_backward_sums_the_q_k_v_input_gradients(fuse_qkv, monkeypatch):
    """In a tiny DRT's gradient, every self-attention norm (lower layers, encoder layers, upper layers)
    hands its backward kernel three d y, one from each projection, and every other norm one; with the
    stacked projection (fuse_qkv) every norm hands one."""
    from drt_jax.model import DRT

    cfg = ModelConfig.from_preset("tiny").replace(gumbel_noise=False, fuse_qkv=fuse_qkv)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (1, cfg.slots_per_chunk * 4), 0, cfg.vocab_size)
    params = DRT(cfg).init(jax.random.PRNGKey(6), tokens)["params"]
    seen = []

    def recording(s, gain, dy, ds, *more_dy, **kw):
        seen.append(1 + len(more_dy))
        return rn.rms_norm_bwd_reference(s, gain, dy, ds, *more_dy, **kw)

    monkeypatch.setitem(rn.FORWARD.impls, "pallas_gpu", rn.rms_norm_reference)
    monkeypatch.setitem(rn.GRADIENT.impls, "pallas_gpu", recording)
    model = DRT(cfg.replace(norm_impl="pallas_gpu"))
    jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens).astype(jnp.float32) ** 2))).lower(params)
    attention_norms = cfg.n_lower + cfg.encoder_layers + sum(cfg.groups)
    norms = 2 * cfg.n_lower + (2 + 2 * cfg.encoder_layers) + 3 * sum(cfg.groups) + 1
    assert sorted(seen) == [1] * (norms - attention_norms) + [1 if fuse_qkv else 3] * attention_norms, seen


def test_a_discarded_sum_gives_the_backward_kernel_no_sum_gradient(monkeypatch):
    """When the caller drops s (the final norms, GCA's MLP norm in the authors' wiring), the backward
    kernel gets no d s to read (a symbolic zero, not a buffer of zeros); when s is used, it gets d s.
    The gradients match the reference's either way."""
    x, r, gain, _, _ = _inputs((3, 5, 40), jnp.float32, 11)
    seen = []

    def recording(s, gain, dy, ds, **kw):
        seen.append(ds is not None)
        return rn.rms_norm_bwd_reference(s, gain, dy, ds, **kw)

    monkeypatch.setitem(rn.FORWARD.impls, "pallas_gpu", rn.rms_norm_reference)
    monkeypatch.setitem(rn.GRADIENT.impls, "pallas_gpu", recording)

    def loss(impl, use_sum):
        def f(x, r, gain):
            s, y = rn.rms_norm(x, gain, residual=r, eps=EPS, impl=impl)
            return jnp.sum(y * y) + (jnp.sum(jnp.sin(s)) if use_sum else 0.0)
        return jax.grad(f, argnums=(0, 1, 2))(x, r, gain)

    for use_sum in (False, True):
        seen.clear()
        got, want = loss("pallas_gpu", use_sum), loss("reference", use_sum)
        assert seen == [use_sum]
        for g, w in zip(got, want, strict=True):
            _close(g, w, 1e-5)
