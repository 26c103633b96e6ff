"""Causal self-attention over a sliding window (or the full prefix), with backend dispatch.

q [B, T, H, D], k/v [B, T, Hkv, D] (H % Hkv == 0) -> [B, T, H, D]. Query i attends to keys
max(0, i - window) .. i, i.e. window + 1 keys including itself; window=None is full causal attention.
Optional ALiBi adds -slope_h * (i - j) to each logit.

Implementations:
  "reference": plain jnp, blocked over the window so memory grows as T * W, not T^2.
  "cudnn":     jax.nn.dot_product_attention on GPU (bf16/fp16, no ALiBi), always with is_causal=True
               because cuDNN with a left window and is_causal=False silently attends to the future.
  "splash":    Pallas splash attention on TPU with a LocalMask (no ALiBi: splash takes no bias).
  "auto":      cudnn on GPU, splash on TPU where they apply, else the reference. ALiBi always goes
               to the reference, the only path on which it is exact.

The chunk encoder's attention within one chunk (`bidirectional_attention`, no mask) resolves `impl`
the same way, on cuDNN with is_causal=False or the reference.

Inference: `cached_attention` runs new slots after a context cached in a ring of R slots (a decode
step through `ring_attention`, a prefill segment through `causal_attention` over the cached prefix).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from pallas_kernels import per_shard

log = logging.getLogger(__name__)

IMPLS = ("auto", "reference", "cudnn", "splash")
SPLASH_BLOCK = 128


def alibi_slopes(num_heads: int):
    """mu_h = 2^(-8 (h + 1) / H) (spec 2.3)."""
    return 2.0 ** (-8.0 * (jnp.arange(num_heads, dtype=jnp.float32) + 1.0) / num_heads)


def _attend(q, k, v, mask, bias, scale):
    """q [B, N, Q, Hkv, G, D], k/v [B, N, K, Hkv, D], mask [N, Q, K], bias [H?, N, Q, K] or None."""
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bnqhgd,bnkhd->bnhgqk", q, k, preferred_element_type=acc) * scale
    if bias is not None:
        logits = logits + bias
    logits = jnp.where(mask[None, :, None, None], logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bnhgqk,bnkhd->bnqhgd", p.astype(v.dtype), v, preferred_element_type=acc)


def attention_reference(q, k, v, *, window: int | None, slopes=None, scale: float | None = None):
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    scale = D**-0.5 if scale is None else scale
    if window is None or window >= T - 1:
        blk, nb = T, 1
    else:
        blk = window
        nb = -(-T // blk)
    Tp = nb * blk
    pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
    qb = jnp.pad(q, pad).reshape(B, nb, blk, Hkv, G, D)
    kb = jnp.pad(k, pad).reshape(B, nb, blk, Hkv, D)
    vb = jnp.pad(v, pad).reshape(B, nb, blk, Hkv, D)
    q_pos = jnp.arange(nb)[:, None] * blk + jnp.arange(blk)[None, :]  # [N, Q]
    if nb == 1:
        keys, values, k_pos = kb, vb, q_pos
    else:
        # Each query block sees its own block and the previous one: blk == window covers i - W .. i.
        prev = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
        keys = jnp.concatenate([prev(kb), kb], axis=2)
        values = jnp.concatenate([prev(vb), vb], axis=2)
        k_pos = jnp.concatenate([q_pos - blk, q_pos], axis=1)
    dist = q_pos[:, :, None] - k_pos[:, None, :]  # [N, Q, K]
    mask = (dist >= 0) & (k_pos[:, None, :] >= 0)
    if window is not None:
        mask = mask & (dist <= window)
    bias = None
    if slopes is not None:
        bias = -slopes.reshape(Hkv, G)[:, :, None, None, None] * dist[None, None]
        bias = bias[None].transpose(0, 3, 1, 2, 4, 5)  # [1, N, Hkv, G, Q, K]
    out = _attend(qb, keys, values, mask, bias, scale)
    return out.reshape(B, Tp, H, D)[:, :T].astype(q.dtype)


def _cudnn(q, k, v, *, window, scale):
    local = None if window is None else (window, 0)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, local_window_size=local, implementation="cudnn"
    )


def _cudnn_unsupported(q, slopes) -> str | None:
    if jax.default_backend() != "gpu":
        return "cuDNN needs a GPU"
    if slopes is not None:
        return "cuDNN has no exact ALiBi without a materialised T x T bias"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention takes bf16/fp16, not {q.dtype}"
    if q.shape[-1] > 256 or q.shape[-1] % 8:
        return f"cuDNN needs head_dim <= 256 and a multiple of 8, got {q.shape[-1]}"
    return None


def splash_attention(q, k, v, *, window: int | None, scale: float | None = None, interpret: bool = False):
    """Splash attention (TPU) with a causal local mask; GQA runs as one MQA kernel per kv head.

    q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]. `interpret=True` runs it on CPU for tests.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    scale = D**-0.5 if scale is None else scale
    # LocalMask's window (W, 0) keeps keys i-W..i; None on the left is plain causal.
    mask = masks.MultiHeadMask([masks.LocalMask((T, T), (window, 0), offset=0) for _ in range(G)])
    block = min(SPLASH_BLOCK, T)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
        block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )
    kernel = splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(B, T, Hkv, G, D).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
    kh = k.transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
    vh = v.transpose(0, 2, 1, 3)
    out = jax.vmap(jax.vmap(kernel))(qh, kh, vh)  # [B, Hkv, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def _splash_unsupported(q, slopes) -> str | None:
    if jax.default_backend() != "tpu":
        return "splash attention needs a TPU"
    if slopes is not None:
        return "splash attention takes no bias, so ALiBi would not be exact"
    if q.shape[1] % min(SPLASH_BLOCK, q.shape[1]) or q.shape[1] < 8:
        return f"splash needs a sequence length that is a multiple of {SPLASH_BLOCK}, got {q.shape[1]}"
    return None


# Dimension names of the operands for per-shard execution (pallas_kernels.per_shard).
_BTHD = ("batch", None, "heads", None)
_LAYOUTS = (_BTHD, _BTHD, _BTHD, ("heads",))


def choose(q, slopes, impl: str) -> tuple[str, str | None]:
    """The implementation `impl` resolves to for q [B, T, H, D] (concrete or abstract) and ALiBi slopes
    (or None): (name, why a faster path was not taken, or None)."""
    fast = {"cudnn": _cudnn_unsupported, "splash": _splash_unsupported}
    name = {"gpu": "cudnn", "tpu": "splash"}.get(jax.default_backend()) if impl == "auto" else impl
    if name not in fast:
        return "reference", None
    why = fast[name](q, slopes)
    return (name, None) if why is None else ("reference", f"{name}: {why}")


def _resolve(q, slopes, impl: str, where: str = "") -> str:
    """choose()'s name for a valid `impl`, with a warning when a named kernel cannot run here."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    name, why = choose(q, slopes, impl)
    if why is not None and impl != "auto":
        log.warning("attention impl %r skipped%s (%s); using the reference", impl, where, why)
    return name


def _pick(q, slopes, *, window, scale, impl):
    """The implementation `impl` resolves to, as kernel(q, k, v, slopes)."""
    name = _resolve(q, slopes, impl)
    if name == "cudnn":
        return lambda q, k, v, slopes: _cudnn(q, k, v, window=window, scale=scale)
    if name == "splash":
        return lambda q, k, v, slopes: splash_attention(q, k, v, window=window, scale=scale)
    return lambda q, k, v, slopes: attention_reference(q, k, v, window=window, slopes=slopes, scale=scale)


def causal_attention(q, k, v, *, window: int | None, slopes=None, scale: float | None = None, impl: str = "auto",
                     kernel_mesh: per_shard.KernelMesh | None = None):
    """Sliding-window (or full) causal self-attention; see the module docstring.

    With a `kernel_mesh` (pallas_kernels.per_shard) every implementation runs per shard: batch rows over
    the batch axes, query and key/value heads (and ALiBi slopes) over the head axes.
    """
    kernel = _pick(q, slopes, window=window, scale=scale, impl=impl)
    return per_shard.run(kernel, (q, k, v, slopes), _LAYOUTS, _BTHD, kernel_mesh)


def bidirectional_attention(q, k, v, *, scale: float | None = None, impl: str = "auto",
                            kernel_mesh: per_shard.KernelMesh | None = None):
    """Full attention without a mask (the chunk encoder, within one chunk): q [N, S, H, D], k/v
    [N, S, Hkv, D] -> [N, S, H, D], N = batch x chunks.

    impl resolves as causal_attention's: cuDNN (is_causal=False, no window) where it applies; the
    reference einsums elsewhere, TPU included: a chunk's S x S scores are one small tile, and the
    einsums' float32 scores in HBM are the bytes cuDNN saves on a GPU (about 1 ms per drt-133m step
    at 16K, both encoder layers).
    """
    if _resolve(q, None, impl, " in the chunk encoder") == "cudnn":
        kernel = lambda q, k, v, slopes: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=False, implementation="cudnn")
    else:
        kernel = lambda q, k, v, slopes: bidirectional_reference(q, k, v, scale=scale)
    return per_shard.run(kernel, (q, k, v, None), _LAYOUTS, _BTHD, kernel_mesh)


def bidirectional_reference(q, k, v, *, scale: float | None = None):
    """bidirectional_attention in plain jnp (the oracle): [N, S, H, D] -> same."""
    N, S, H, D = q.shape
    Hkv = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    qg = q.reshape(N, S, Hkv, H // Hkv, D)
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("nqhgd,nkhd->nhgqk", qg, k, preferred_element_type=acc) * scale
    p = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("nhgqk,nkhd->nqhgd", p.astype(v.dtype), v, preferred_element_type=acc)
    return out.reshape(N, S, H, D).astype(q.dtype)


# --------------------------------------------------------------------------------------------------
# Incremental attention over a ring of cached slots (inference)
#
# A ring of R rows holds the keys/values of the last R slots, slot p at row p % R. R = window + 2 keeps
# the whole window of both slots of a decode step that closes a chunk (its token and its landmark).
# --------------------------------------------------------------------------------------------------


def ring_write(ring, x, positions):
    """ring [B, R, ...], x [B, n, ...] at absolute slots positions [n] (n <= R) -> the ring holding them."""
    return ring.at[:, jnp.mod(positions, ring.shape[1])].set(x.astype(ring.dtype))


def ring_positions(last, R: int):
    """[R]: the absolute slot each ring row holds once slots up to `last` are written (negative: empty)."""
    r = jnp.arange(R)
    return last - jnp.mod(last - r, R)


def ring_attention(q, ring_k, ring_v, q_pos, k_pos, *, window: int | None, slopes=None):
    """q [B, n, H, D] at absolute slots q_pos [n] over ring keys/values [B, R, Hkv, D] at slots k_pos [R].

    The mask and the ALiBi distances come from absolute positions, so query i sees i - window .. i as in
    the full forward. A few query slots against R keys: plain jnp, no kernel.
    """
    B, n, H, D = q.shape
    Hkv = ring_k.shape[2]
    G = H // Hkv
    dist = q_pos[:, None] - k_pos[None, :]
    mask = (k_pos[None, :] >= 0) & (dist >= 0)
    if window is not None:
        mask = mask & (dist <= window)
    qg = q.reshape(B, n, Hkv, G, D)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, ring_k, preferred_element_type=jnp.float32) * (D**-0.5)
    if slopes is not None:
        logits = logits - slopes.reshape(Hkv, G)[:, :, None, None] * dist.astype(jnp.float32)
    logits = jnp.where(mask[None, None, None], logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(ring_v.dtype), ring_v, preferred_element_type=jnp.float32)
    return out.reshape(B, n, H, D).astype(q.dtype)


def cached_attention(q, k, v, ring_k, ring_v, positions, *, window: int | None, slopes=None,
                     prefix: int | None, impl: str = "auto", kernel_mesh: per_shard.KernelMesh | None = None):
    """Causal self-attention of new slots that follow the slots cached in a ring -> (out, ring_k, ring_v).

    q [B, n, H, D], k/v [B, n, Hkv, D] at absolute slots positions [n] (consecutive); ring_k/ring_v
    [B, R, Hkv, D]. prefix None: a decode step (n <= 2), written into the ring first and attending over
    it. prefix P: a prefill segment, attending causally over the P cached slots before it and itself
    (P = min(position, window), static), through `causal_attention`; its last R slots are then cached.
    """
    R = ring_k.shape[1]
    if prefix is None:
        ring_k, ring_v = ring_write(ring_k, k, positions), ring_write(ring_v, v, positions)
        out = ring_attention(q, ring_k, ring_v, positions, ring_positions(positions[-1], R), window=window,
                             slopes=slopes)
        return out, ring_k, ring_v
    attend = functools.partial(causal_attention, window=window, slopes=slopes, impl=impl, kernel_mesh=kernel_mesh)
    if prefix:
        rows = jnp.mod(positions[0] - prefix + jnp.arange(prefix), R)
        k_all = jnp.concatenate([ring_k[:, rows].astype(k.dtype), k], axis=1)
        v_all = jnp.concatenate([ring_v[:, rows].astype(v.dtype), v], axis=1)
        # The cached slots need no outputs: zero queries stand in for them and are cut off.
        q_all = jnp.concatenate([jnp.zeros((q.shape[0], prefix) + q.shape[2:], q.dtype), q], axis=1)
        out = attend(q_all, k_all, v_all)[:, prefix:]
    else:
        out = attend(q, k, v)
    keep = min(q.shape[1], R)
    ring_k = ring_write(ring_k, k[:, -keep:], positions[-keep:])
    ring_v = ring_write(ring_v, v[:, -keep:], positions[-keep:])
    return out, ring_k, ring_v
