"""Linen layers of DRT. Thin: they own parameters and call the pure functions.

Every parameter carries logical axis names (embed, heads, kv_heads, head_dim, mlp, vocab, norm) so
the trainer can shard it through a rules table. Shapes: B batch, L slots, d model width,
H / Hkv query / key-value heads, Dh head dim, C chunks, S tokens per chunk, M memory chunks.

The decoder layers also run incrementally (inference): given `cache=Incremental(...)`, self-attention
keeps a ring of past keys/values in the "cache" collection and attends from the new slots over it,
and GCA reads whatever chunk memory the caller passes. The weights and the math are the same.
`kernel_mesh` (pallas_kernels.per_shard.KernelMesh) makes attention and GCA kernels run per shard.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.attention import alibi_slopes, bidirectional_attention, cached_attention, causal_attention
from drt_jax.config import ModelConfig
from pallas_kernels import grouped_cross_attention
from pallas_kernels.per_shard import KernelMesh
from pallas_kernels.rmsnorm import residual_add, rms_norm
from pallas_kernels.swiglu import swiglu


def _dtype(name: str):
    return jnp.dtype(name)


def _init(cfg: ModelConfig, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


def dense(cfg: ModelConfig, features, axes: tuple[str, ...], name: str, axis=-1):
    return nn.DenseGeneral(
        features, axis=axis, use_bias=False, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype),
        kernel_init=_init(cfg, axes), name=name,
    )


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * gain, computed in float32, returned in the compute dtype.

    Called as norm(delta, residual=h) it also takes the residual add before it and returns
    (h + delta, its norm): one kernel where XLA makes two passes (pallas_kernels.rmsnorm; `impl` is
    cfg.norm_impl). With `copies` n > 1 the norm comes back as n arrays, one a reader, so that the
    backward kernel sums their gradients. x [B, ..., d], batch first."""

    eps: float
    dtype: str = "float32"
    impl: str = "auto"
    kernel_mesh: KernelMesh | None = None

    @nn.compact
    def __call__(self, x, residual=None, copies: int = 1):
        gain = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],))
        return rms_norm(x, gain, residual=residual, eps=self.eps, out_dtype=_dtype(self.dtype), impl=self.impl,
                        kernel_mesh=self.kernel_mesh, copies=copies)


def norm(cfg: ModelConfig, name: str, kernel_mesh: KernelMesh | None = None, eps: float | None = None) -> RMSNorm:
    """The model's RMSNorm: cfg's epsilon (or `eps`), compute dtype and norm kernels."""
    return RMSNorm(cfg.norm_eps if eps is None else eps, cfg.dtype, cfg.norm_impl, kernel_mesh, name=name)


class Stream(NamedTuple):
    """A residual stream whose last add is still pending: its value is base + delta, both [B, L, d].

    A decoder or encoder layer returns its output this way, and the next layer's first norm takes the
    add into its kernel (rms_norm's residual): the add costs no pass of its own, and the two gradients
    of the layer's input (through the norm and through the residual) are summed in the norm's backward.
    """

    base: jax.Array
    delta: jax.Array


def resolve(h):
    """h: [B, L, d] or a Stream -> its value [B, L, d], rounded as a fused norm would round it."""
    return residual_add(h.delta, h.base) if isinstance(h, Stream) else h


def normed(norm_module: RMSNorm, h, copies: int = 1):
    """h: [B, L, d] or a Stream -> (its value, norm_module(value)), the pending add fused into the norm;
    with `copies` > 1 the norm is a tuple of that many copies (RMSNorm)."""
    if isinstance(h, Stream):
        return norm_module(h.delta, residual=h.base, copies=copies)
    return h, norm_module(h, copies=copies)


def rope_angles(positions, half_dim: int, theta: float, dtype=jnp.float32):
    """positions int [...] -> RoPE angles [..., half_dim], accurate for any position below 2^31.

    The plain product position * frequency loses the angle in float32 once positions reach
    millions (at 2^24 slots, about 16.5M tokens, even the position is no longer exact), and
    inference rotates keys at absolute slot positions. So the position is split into 10-bit
    digits, and each digit's angle is reduced modulo 2 pi with constants computed in float64.
    Float positions (no caller passes them) get the plain product.
    """
    freq = theta ** (-np.arange(half_dim, dtype=np.float64) * 2.0 / (2 * half_dim))
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        return positions.astype(dtype)[..., None] * freq.astype(dtype)
    pos = positions.astype(jnp.int32)[..., None]
    two_pi = 2.0 * np.pi
    angle = jnp.zeros(pos.shape[:-1] + (half_dim,), dtype)
    for shift in (0, 10, 20):
        digit = (pos >> shift if shift == 20 else (pos >> shift) & 1023).astype(dtype)
        step = np.mod(freq * 2.0**shift, two_pi).astype(dtype)
        angle = angle + jnp.mod(digit * step, two_pi)
    return angle


def apply_rope(x, positions, theta: float):
    """Rotate-half RoPE. x [..., T, H, D], positions [T] or [B, T] (broadcast against x)."""
    D = x.shape[-1]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    angle = rope_angles(positions, D // 2, theta, acc)  # [..., T, D/2]
    cos = jnp.cos(angle)[..., None, :]
    sin = jnp.sin(angle)[..., None, :]
    x1, x2 = jnp.split(x.astype(acc), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Incremental:
    """How the decoder's self-attention runs on new slots that follow a cached context.

    ring: R, the slots each layer's cache holds: cached_key, cached_value [B, R, Hkv, Dh] (RoPE applied),
      slot p at row p % R; window + 2 for sliding-window attention, the longest context for full attention.
    prefix: None for a decode step (1 or 2 slots); for a prefill segment, the cached slots before it
      that its first slot sees (min(position, window)).
    """

    ring: int
    prefix: int | None = None


def qkv_inputs(cfg: ModelConfig) -> int:
    """The copies of the attention norm's output a layer takes: one for each of the q, k and v
    projections, so that the norm's backward kernel sums their three input gradients where XLA would
    add them in a pass of their own; one for the stacked projection (cfg.fuse_qkv)."""
    return 1 if cfg.fuse_qkv else 3


class SelfAttention(nn.Module):
    """Causal sliding-window self-attention (decoder) or bidirectional attention (chunk encoder).

    x [B, L, d] (or three copies of it, see `qkv_inputs`) -> [B, L, d]. `positions` [L] are absolute slot
    indices, used by RoPE and ALiBi. With `cache` (decoder only) the L slots follow the context held in the
    "cache" collection (see Incremental).
    """

    cfg: ModelConfig
    bidirectional: bool = False
    kernel_mesh: KernelMesh | None = None

    def projections(self, x):
        """x [B, L, d], or a tuple of three copies of it (`qkv_inputs`) -> q [B, L, H, Dh], k, v [B, L, Hkv, Dh].

        With cfg.fuse_qkv the three kernels are stacked as [d, Hkv, G + 2, Dh] (G = H / Hkv query heads
        a key-value head, in GQA's order: query head h reads key-value head h // G), so a tensor-parallel
        split of the heads stays a split of the stacked kernel's key-value heads."""
        cfg = self.cfg
        H, Hkv, Dh = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        q_shape, q_axes = (H, Dh), ("embed", "heads", "head_dim")
        kv_shape, kv_axes = (Hkv, Dh), ("embed", "kv_heads", "head_dim")
        xs = x if isinstance(x, tuple) else (x,) * 3
        if not cfg.fuse_qkv:
            return tuple(dense(cfg, shape, axes, name)(x) for x, shape, axes, name in
                         zip(xs, (q_shape, kv_shape, kv_shape), (q_axes, kv_axes, kv_axes), "qkv", strict=True))
        x = xs[0]
        d, G, dtype = x.shape[-1], H // Hkv, _dtype(cfg.dtype)
        wq = _Kernel(cfg, (d, *q_shape), q_axes, name="q")()
        wk = _Kernel(cfg, (d, *kv_shape), kv_axes, name="k")()
        wv = _Kernel(cfg, (d, *kv_shape), kv_axes, name="v")()
        w = jnp.concatenate([wq.reshape(d, Hkv, G, Dh), wk[:, :, None], wv[:, :, None]], axis=2).astype(dtype)
        qkv = jnp.einsum("...d,dkge->...kge", x.astype(dtype), w)
        return qkv[..., :G, :].reshape(*qkv.shape[:-3], H, Dh), qkv[..., G, :], qkv[..., G + 1, :]

    @nn.compact
    def __call__(self, x, positions, cache: Incremental | None = None):
        cfg = self.cfg
        H, Hkv, Dh = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        q, k, v = self.projections(x)
        if self.bidirectional:
            # The encoder always uses RoPE with positions 0..S inside the chunk (spec 2.4).
            q, k = apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)
            out = bidirectional_attention(q, k, v, impl=cfg.attention_impl, kernel_mesh=self.kernel_mesh)
        else:
            slopes = None
            if cfg.position == "rope":
                q, k = apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)
            else:
                slopes = alibi_slopes(H)
            if cache is None:
                out = causal_attention(q, k, v, window=cfg.window, slopes=slopes, impl=cfg.attention_impl,
                                       kernel_mesh=self.kernel_mesh)
            else:
                ring_shape = (q.shape[0], cache.ring, Hkv, Dh)
                ring_k = self.variable("cache", "cached_key", jnp.zeros, ring_shape, k.dtype)
                ring_v = self.variable("cache", "cached_value", jnp.zeros, ring_shape, v.dtype)
                out, ring_k.value, ring_v.value = cached_attention(
                    q, k, v, ring_k.value, ring_v.value, positions, window=cfg.window, slopes=slopes,
                    prefix=cache.prefix, impl=cfg.attention_impl, kernel_mesh=self.kernel_mesh,
                )
        return dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), "o", axis=(-2, -1))(out)


class _Kernel(nn.Module):
    """The kernel [d, F] of a bias-free projection, declared as nn.DenseGeneral declares it (the same
    parameter path, <name>/kernel, initializer and logical axes), for a caller that multiplies it itself."""

    cfg: ModelConfig
    shape: tuple[int, ...]
    axes: tuple[str, ...]

    @nn.compact
    def __call__(self):
        return self.param("kernel", _init(self.cfg, self.axes), self.shape, _dtype(self.cfg.param_dtype))


class MLP(nn.Module):
    """SwiGLU: W_down(silu(W_gate x) * W_up x), no biases.

    The gate and up kernels (parameters mlp/gate/kernel and mlp/up/kernel, as separate projections
    would have them) are stacked into one [d, 2, F] GEMM, whose gradient `swiglu` hands back as one
    array: one GEMM for d x and one for the two kernels' gradients, where two projections took two each.
    cfg.mlp_impl picks how that gradient is taken (pallas_kernels.swiglu)."""

    cfg: ModelConfig
    kernel_mesh: KernelMesh | None = None

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        shape, axes = (cfg.d_model, cfg.mlp_dim), ("embed", "mlp")
        gate = _Kernel(cfg, shape, axes, name="gate")()
        up = _Kernel(cfg, shape, axes, name="up")()
        dtype = _dtype(cfg.dtype)
        kernel = jnp.stack([gate, up], axis=1).astype(dtype)
        gate_up = jnp.einsum("...d,dkf->...kf", x.astype(dtype), kernel)
        h = swiglu(gate_up, impl=cfg.mlp_impl, kernel_mesh=self.kernel_mesh)
        return dense(cfg, cfg.d_model, ("mlp", "embed"), "down")(h)


class LowerLayer(nn.Module):
    """Pre-norm Llama block: h + SA(norm(h)), then + MLP(norm(.)). Also the baselines' layer and,
    with `bidirectional`, the chunk encoder's layer (full attention within one chunk, RoPE positions
    0..S, the encoder's own norm epsilon).

    h [B, L, d] or a Stream -> a Stream: the last residual add is left to the next norm."""

    cfg: ModelConfig
    deterministic: bool = True
    bidirectional: bool = False
    kernel_mesh: KernelMesh | None = None

    @nn.compact
    def __call__(self, h, positions, cache: Incremental | None = None):
        cfg = self.cfg
        eps = cfg.encoder_norm_eps if self.bidirectional else cfg.norm_eps
        drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        attn = SelfAttention(cfg, bidirectional=self.bidirectional, kernel_mesh=self.kernel_mesh, name="attn")
        km = self.kernel_mesh
        h, x = normed(norm(cfg, "attn_norm", km, eps), h, qkv_inputs(cfg))
        a, x = norm(cfg, "mlp_norm", km, eps)(drop(attn(x, positions, cache)), residual=h)
        return Stream(a, drop(MLP(cfg, km, name="mlp")(x)))


class GroupedCrossAttention(nn.Module):
    """GCA block: queries from norm(a), keys/values from the shared chunk memory (spec 4.1).

    a [B, C*Sq, d]; k_mem, v_mem [B, M, S, Hkv, Dh]; indices, weights [B, C, K] -> [B, C*Sq, d]: the Sq
    slots of query chunk c read its row of indices. Sq = S+1 in the full forward; a decode step passes
    its 1-2 slots as one query chunk.
    """

    cfg: ModelConfig
    kernel_mesh: KernelMesh | None = None

    @nn.compact
    def __call__(self, a, k_mem, v_mem, indices, weights, residual=None):
        """With `residual`, GCA reads norm(a + residual) and returns (a + residual, its output)."""
        cfg = self.cfg
        B, L, _ = a.shape
        C = indices.shape[1]
        x = norm(cfg, "norm", self.kernel_mesh)(a, residual=residual)
        if residual is not None:
            a, x = x
        q = dense(cfg, (cfg.n_heads, cfg.head_dim), ("embed", "heads", "head_dim"), "q")(x)
        q = q.reshape(B, C, L // C, cfg.n_heads, cfg.head_dim)
        out = grouped_cross_attention(
            q, k_mem, v_mem, indices, weights,  # float32: the kernels accumulate in fp32
            softmax_off_by_one=cfg.gca_off_by_one, impl=cfg.gca_impl, kernel_mesh=self.kernel_mesh,
        )
        out = out.reshape(B, L, cfg.n_heads, cfg.head_dim)
        out = dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), "o", axis=(-2, -1))(out)
        return out if residual is None else (a, out)


class UpperLayer(nn.Module):
    """Self-attention -> GCA -> MLP (spec 2.6).

    "authors" wiring: a = h + SA(norm h); b = a + GCA(a); h' = a + MLP(norm b) (GCA reaches the
    residual stream only through the MLP input, as in the released code). "standard": h' = b + MLP(norm b).
    h [B, L, d] or a Stream -> a Stream (h' with its last add pending).
    """

    cfg: ModelConfig
    deterministic: bool = True
    kernel_mesh: KernelMesh | None = None

    @nn.compact
    def __call__(self, h, positions, k_mem, v_mem, indices, weights, cache: Incremental | None = None):
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        attn = SelfAttention(cfg, kernel_mesh=self.kernel_mesh, name="attn")
        km = self.kernel_mesh
        gca = GroupedCrossAttention(cfg, kernel_mesh=km, name="gca")
        h, x = normed(norm(cfg, "attn_norm", km), h, qkv_inputs(cfg))
        a, g = gca(drop(attn(x, positions, cache)), k_mem, v_mem, indices, weights, residual=h)
        b, x = norm(cfg, "mlp_norm", km)(drop(g), residual=a)
        base = a if cfg.gca_residual == "authors" else b
        return Stream(base, drop(MLP(cfg, km, name="mlp")(x)))


class ChunkEncoder(nn.Module):
    """Encodes every chunk's lower-layer states into its retrieval key and memory K/V (spec 2.4).

    u [B, C*(S+1), d] -> (landmark keys [B, C, d], k_mem [B, C, S, Hkv, Dh], v_mem [B, C, S, Hkv, Dh]).
    The memory drops the landmark row; the off-by-one GCA softmax stands in for the authors' zeroed
    row, which is the same function for any chunk size.
    """

    cfg: ModelConfig
    deterministic: bool = True
    kernel_mesh: KernelMesh | None = None

    @nn.compact
    def __call__(self, u):
        cfg = self.cfg
        B, L, d = u.shape
        S1 = cfg.slots_per_chunk
        C = L // S1
        x = norm(cfg, "pre_norm", self.kernel_mesh, cfg.encoder_norm_eps)(u).reshape(B * C, S1, d)
        positions = jnp.arange(S1)
        layer_cls = maybe_remat(LowerLayer, cfg)
        for i in range(cfg.encoder_layers):
            x = layer_cls(cfg, self.deterministic, bidirectional=True, kernel_mesh=self.kernel_mesh,
                          name=f"layer_{i}")(x, positions)
        _, e = normed(norm(cfg, "final_norm", self.kernel_mesh, cfg.encoder_norm_eps), x)
        e = e.reshape(B, C, S1, d)
        landmark_keys = e[:, :, cfg.chunk_size]
        tokens = e[:, :, : cfg.chunk_size]
        kv_shape, kv_axes = (cfg.kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim")
        k_mem = dense(cfg, kv_shape, kv_axes, "mem_k")(tokens)
        v_mem = dense(cfg, kv_shape, kv_axes, "mem_v")(tokens)
        return landmark_keys, k_mem, v_mem


def maybe_remat(layer_cls, cfg: ModelConfig):
    """Wraps a layer class in nn.remat according to cfg.remat ("none", "full", "dots"; "auto" is resolved
    by the trainer before it builds its step, and means "none" here)."""
    if cfg.remat in ("none", "auto"):
        return layer_cls
    policy = None if cfg.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nn.remat(layer_cls, policy=policy, prevent_cse=True)
