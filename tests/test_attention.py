"""The blocked sliding-window reference against a dense masked softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax.attention import (
    alibi_slopes,
    attention_reference,
    bidirectional_attention,
    bidirectional_reference,
    causal_attention,
)
from drt_jax.config import ModelConfig


def dense_masked(q, k, v, window, slopes):
    B, T, H, D = q.shape
    G = H // k.shape[2]
    k = jnp.repeat(k, G, axis=2)
    v = jnp.repeat(v, G, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
    i = jnp.arange(T)[:, None]
    j = jnp.arange(T)[None, :]
    mask = j <= i
    if window is not None:
        mask &= i - j <= window
    if slopes is not None:
        logits = logits - slopes[None, :, None, None] * (i - j)[None, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)


@pytest.mark.parametrize("T, window", [(37, 8), (40, 8), (16, 31), (9, 8), (50, None)])
@pytest.mark.parametrize("alibi", [False, True])
def test_reference_matches_dense_mask(T, window, alibi):
    keys = jax.random.split(jax.random.PRNGKey(T), 3)
    q = jax.random.normal(keys[0], (2, T, 4, 8))
    k = jax.random.normal(keys[1], (2, T, 2, 8))
    v = jax.random.normal(keys[2], (2, T, 2, 8))
    slopes = alibi_slopes(4) if alibi else None
    got = attention_reference(q, k, v, window=window, slopes=slopes)
    np.testing.assert_allclose(got, dense_masked(q, k, v, window, slopes), atol=2e-5, rtol=2e-5)


def test_window_is_w_plus_one_keys():
    # Query i sees exactly i - W .. i: changing key i - W - 1 leaves it alone, key i - W does not.
    T, W, i = 30, 6, 20
    q = jax.random.normal(jax.random.PRNGKey(0), (1, T, 1, 4))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, T, 1, 4))
    v = jax.random.normal(jax.random.PRNGKey(2), (1, T, 1, 4))
    base = attention_reference(q, k, v, window=W)[0, i]
    outside = attention_reference(q, k, v.at[0, i - W - 1].add(1.0), window=W)[0, i]
    inside = attention_reference(q, k, v.at[0, i - W].add(1.0), window=W)[0, i]
    np.testing.assert_array_equal(base, outside)
    assert np.abs(np.asarray(base - inside)).max() > 1e-4


def test_auto_on_cpu_is_the_reference_and_unknown_impl_fails():
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 12, 2, 4))
    np.testing.assert_array_equal(causal_attention(q, q, q, window=4), attention_reference(q, q, q, window=4))
    with pytest.raises(ValueError, match="unknown attention impl"):
        causal_attention(q, q, q, window=4, impl="flash9")


@pytest.mark.parametrize("window, gqa", [(64, 2), (None, 1), (200, 4)])
def test_splash_in_interpret_mode_matches_reference(window, gqa):
    from drt_jax.attention import splash_attention

    T, H, D = 256, 4, 32
    keys = jax.random.split(jax.random.PRNGKey(window or 0), 4)
    q = jax.random.normal(keys[0], (1, T, H, D))
    k = jax.random.normal(keys[1], (1, T, H // gqa, D))
    v = jax.random.normal(keys[2], (1, T, H // gqa, D))
    cot = jax.random.normal(keys[3], q.shape)
    got = splash_attention(q, k, v, window=window, interpret=True)
    np.testing.assert_allclose(got, attention_reference(q, k, v, window=window), atol=2e-5, rtol=2e-5)
    grad = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * cot), argnums=(0, 1, 2))(q, k, v)
    g_splash = grad(lambda q, k, v: splash_attention(q, k, v, window=window, interpret=True))
    g_ref = grad(lambda q, k, v: attention_reference(q, k, v, window=window))
    for a, b in zip(g_splash, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_splash_lowers_for_tpu():
    from drt_jax.attention import splash_attention

    q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    k = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    text = jax.jit(lambda q, k, v: splash_attention(q, k, v, window=128)).trace(q, k, k).lower(
        lowering_platforms=("tpu",)
    ).as_text()
    assert "tpu_custom_call" in text


def test_explicit_fast_impl_off_its_backend_falls_back_with_a_logged_reason(caplog):
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 2, 8))
    with caplog.at_level("WARNING"):
        out = causal_attention(q, q, q, window=4, impl="cudnn")
    assert "cuDNN needs a GPU" in caplog.text
    np.testing.assert_array_equal(out, attention_reference(q, q, q, window=4))


def _as_xla_cudnn(monkeypatch):
    """Routes the cuDNN path's jax.nn.dot_product_attention calls to its XLA implementation, so that a
    CPU runs the call the GPU makes; -> the list of (implementation, is_causal, local_window_size) of
    every call."""
    from drt_jax import attention

    calls = []
    real = jax.nn.dot_product_attention

    def as_xla(*args, implementation=None, **kwargs):
        calls.append((implementation, kwargs["is_causal"], kwargs.get("local_window_size")))
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
    monkeypatch.setattr(attention, "_cudnn_unsupported", lambda q, slopes: None)
    return calls


@pytest.mark.parametrize("window", [5, 8, None])
def test_cudnn_call_keeps_the_window_convention_on_cpu(window, monkeypatch):
    """The GPU default path's call, on CPU: the same jax.nn.dot_product_attention call the cuDNN path makes,
    run by its XLA implementation, equals the reference (query i sees keys i - window .. i)."""
    calls = _as_xla_cudnn(monkeypatch)
    T, H, Hkv, D = 29, 4, 2, 16
    keys = jax.random.split(jax.random.PRNGKey(window or 0), 4)
    q, k, v = (jax.random.normal(kk, (2, T, h, D)) for kk, h in zip(keys, (H, Hkv, Hkv), strict=False))
    cot = jax.random.normal(keys[3], q.shape)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * cot)
    cudnn = lambda q, k, v: causal_attention(q, k, v, window=window, impl="cudnn")
    reference = lambda q, k, v: attention_reference(q, k, v, window=window)
    np.testing.assert_allclose(cudnn(q, k, v), reference(q, k, v), atol=1e-5, rtol=1e-5)
    grads = [jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v) for f in (cudnn, reference)]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert calls and set(calls) == {("cudnn", True, None if window is None else (window, 0))}, calls


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a CUDA GPU")
@pytest.mark.parametrize("window", [64, None])
def test_cudnn_sliding_window_matches_reference_on_gpu(window):
    T, H, Hkv, D = 512, 4, 2, 64
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    q, k, v = (jax.random.normal(kk, (2, T, h, D), jnp.bfloat16) for kk, h in zip(keys, (H, Hkv, Hkv), strict=False))
    cot = jax.random.normal(keys[3], q.shape, jnp.float32)
    got = causal_attention(q, k, v, window=window, impl="cudnn")
    ref = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), window=window)
    err = float(jnp.linalg.norm(got.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    assert err < 2e-2, f"cuDNN sliding window disagrees with the reference: rel. error {err:.3g}"
    grads = lambda f, *xs: jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cot), argnums=(0, 1, 2))(*xs)
    g_cudnn = grads(lambda q, k, v: causal_attention(q, k, v, window=window, impl="cudnn"), q, k, v)
    g_ref = grads(lambda q, k, v: attention_reference(q, k, v, window=window), *(x.astype(jnp.float32) for x in (q, k, v)))
    for a, b in zip(g_cudnn, g_ref, strict=True):
        rel = float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
        assert rel < 3e-2, f"cuDNN gradient rel. error {rel:.3g}"


def _dense_bidirectional(q, k, v):
    G = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    p = jax.nn.softmax(jnp.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(q.shape[-1]), -1)
    return jnp.einsum("nhqk,nkhd->nqhd", p, v)


def test_the_chunk_encoders_cudnn_call_attends_to_the_whole_chunk_on_cpu(monkeypatch):
    """The encoder's GPU call (cuDNN, is_causal=False, GQA), run by XLA: outputs and the three gradients
    equal the reference's, which equals a dense softmax over every slot of the chunk."""
    calls = _as_xla_cudnn(monkeypatch)
    N, S, H, Hkv, D = 5, 9, 4, 2, 16
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    q, k, v = (jax.random.normal(kk, (N, S, h, D)) for kk, h in zip(keys, (H, Hkv, Hkv), strict=False))
    cot = jax.random.normal(keys[3], q.shape)
    cudnn = lambda q, k, v: bidirectional_attention(q, k, v, impl="cudnn")
    np.testing.assert_allclose(bidirectional_reference(q, k, v), _dense_bidirectional(q, k, v), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(cudnn(q, k, v), bidirectional_reference(q, k, v), atol=1e-5, rtol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * cot)
    grads = [jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v) for f in (cudnn, bidirectional_reference)]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert calls and set(calls) == {("cudnn", False, None)}, calls


def test_a_drt_forward_runs_its_chunk_encoder_on_the_configs_attention_kernel(monkeypatch):
    """With cuDNN available, the model's encoder layers call it without the causal mask (one call per
    encoder layer) and the decoder layers with it; the logits equal those of the reference kernels."""
    from drt_jax.model import DRT
    from tests.conftest import small_config

    cfg = small_config(encoder_layers=2, dropout_rate=0.0, gumbel_noise=False)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 4 * cfg.chunk_size + 2), 0, cfg.landmark_id)
    params = DRT(cfg).init(jax.random.PRNGKey(1), tokens)
    want = DRT(cfg.replace(attention_impl="reference")).apply(params, tokens)
    calls = _as_xla_cudnn(monkeypatch)
    got = DRT(cfg.replace(attention_impl="cudnn")).apply(params, tokens)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    assert [c[:2] for c in calls].count(("cudnn", False)) == cfg.encoder_layers, calls
    assert [c[:2] for c in calls].count(("cudnn", True)) == sum(cfg.decoder_layers), calls


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a CUDA GPU")
def test_cudnn_chunk_attention_matches_reference_on_gpu():
    N, S, H, Hkv, D = 24, 64, 4, 2, 64
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    q, k, v = (jax.random.normal(kk, (N, S, h, D), jnp.bfloat16) for kk, h in zip(keys, (H, Hkv, Hkv), strict=False))
    cot = jax.random.normal(keys[3], q.shape, jnp.float32)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    cudnn = lambda q, k, v: bidirectional_attention(q, k, v, impl="cudnn")
    got, ref = cudnn(q, k, v).astype(jnp.float32), bidirectional_reference(*f32)
    err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert err < 2e-2, f"cuDNN chunk attention disagrees with the reference: rel. error {err:.3g}"
    grads = lambda f, *xs: jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cot), argnums=(0, 1, 2))(*xs)
    for a, b in zip(grads(cudnn, q, k, v), grads(bidirectional_reference, *f32), strict=True):
        rel = float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
        assert rel < 3e-2, f"cuDNN chunk attention gradient rel. error {rel:.3g}"


@pytest.mark.parametrize("base", [17_000_000, 2**30])
def test_rope_stays_relative_at_16m_token_positions(base):
    """Inference rotates keys at absolute slot positions, which pass 2^24 (float32's last exact
    integer) beyond 16M tokens: q(base+i).k(base+j) must still equal q(i).k(j)."""
    from drt_jax.layers import apply_rope

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 16, 2, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 16, 2, 64)), jnp.float32)
    pos = jnp.arange(16, dtype=jnp.int32)

    def logits(offset):
        qr = apply_rope(q, pos + offset, 10000.0)
        kr = apply_rope(k, pos + offset, 10000.0)
        return jnp.einsum("bqhd,bkhd->bhqk", qr, kr)

    np.testing.assert_allclose(logits(base), logits(0), atol=2e-2)


def test_rope_angles_match_float64_at_any_position():
    from drt_jax.layers import rope_angles

    pos = np.array([0, 1, 1023, 1024, 16_640, 1_000_003, 2**24 + 1, 17_000_000, 2**31 - 1], np.int64)
    freq = 10000.0 ** (-np.arange(32) * 2.0 / 64)
    exact = pos[:, None].astype(np.float64) * freq
    got = np.asarray(rope_angles(jnp.asarray(pos, jnp.int32), 32, 10000.0), np.float64)
    wrapped = np.angle(np.exp(1j * (got - exact)))  # the difference modulo 2 pi
    assert np.abs(wrapped).max() < 5e-3


def test_the_kernel_report_says_when_a_config_leaves_the_fast_path(monkeypatch):
    """One line names the kernels a config runs; a float32 model on a GPU, whose "auto" attention can only
    be the reference (cuDNN takes bf16/fp16), says so with the reason, as does a named kernel that
    cannot run here."""
    from drt_jax.kernels import kernel_report

    swa = ModelConfig.from_preset("tiny").replace(arch="swa", decoder_layers=(2,))
    assert kernel_report(swa) == ("kernels on cpu: attention reference, SwiGLU gradient reference, RMSNorm reference, "
                                 "log-normaliser reference")
    assert "attention reference (cudnn: cuDNN needs a GPU; model.attention_impl=cudnn)" in kernel_report(
        swa.replace(attention_impl="cudnn"))
    drt = ModelConfig.from_preset("tiny")
    assert kernel_report(drt) == ("kernels on cpu: attention reference, GCA reference, SwiGLU gradient reference, "
                                  "RMSNorm reference, log-normaliser reference")
    assert ("SwiGLU gradient reference (pallas_gpu: pallas_gpu needs a CUDA GPU (backend is cpu); "
            "model.mlp_impl=pallas_gpu)") in kernel_report(drt.replace(mlp_impl="pallas_gpu"))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert kernel_report(swa.replace(dtype="bfloat16")) == ("kernels on gpu: attention cudnn, SwiGLU gradient pallas_gpu, "
                                                            "RMSNorm pallas_gpu, log-normaliser pallas_gpu")
    report = kernel_report(swa)
    assert report.startswith("kernels on gpu: attention reference (cudnn: ") and "not float32" in report, report
