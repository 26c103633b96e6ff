"""Incremental inference for DRT (and the swa / full baselines): prefill in segments, decode steps.

State (explicit, passed in and returned; `InferenceState`):
  * ring_k / ring_v [NL, B, R, Hkv, Dh]: sliding-window keys (RoPE already applied) and values of
    every decoder layer (lower and upper), a ring of R = window + 2 slots indexed by slot % R
    (R = capacity for arch="full"). A decode step writes its 1-2 new slots, then attends over the ring
    with a mask built from absolute slot positions (query i sees i-W..i, as in training).
  * chunk_buf [B, S+1, d]: lower-layer outputs of the slots of the unfinished chunk.
  * mem_lmk [B, E, d]: landmark keys of the E-slot chunk memory (always on the device);
    mem_k / mem_v [B, E, S, Hkv, Dh]: chunk memory on the device, or None when offloaded, in which
    case `host` (a HostMemory) holds them in numpy and only the top-k chunks of each group travel.
    Rows >= n_chunks are unused and masked out of retrieval (visibility j < query chunk).
  * ret_idx / ret_w [G, B, K] and ret_k / ret_v [G, B, K, S, Hkv, Dh]: per retrieval group, the
    current retrieval (made by the last completed chunk's landmark, with that group's landmark
    RMSNorm) and its gathered chunks; every slot of the current chunk reads them through GCA.
  * host ints pos (slots consumed), ntok (real tokens consumed), n_chunks (completed chunks).

At a chunk boundary the decode step gets (token, LANDMARK), encodes the finished chunk from the
buffered lower states, appends it to memory, runs every group's layers with the *old* retrieval and
computes each group's *new* retrieval from the landmark slot of the hidden state entering the group.

Prefill runs whole chunks in segments of `segment_chunks` chunks (bounded device memory): each segment
attends to the previous W slots through the ring, retrieves over all earlier chunks (global chunk ids),
and its first chunk reads the previous segment's last retrieval (the authors' code gives it none).
A partial last chunk of the prompt is fed through decode steps. The swa baseline prefills in segments
of the same number of tokens (segment_chunks * chunk_size); its tail shorter than that is one more
segment, not decode steps.

Shapes are fixed per (batch, capacity), so decoding does not recompile as the context grows; the memory
capacity grows in blocks of `memory_block` chunks (one recompile per block) unless `max_chunks` is set
large enough up front.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from drt_jax import chunking, retrieval
from drt_jax.attention import alibi_slopes, causal_attention
from drt_jax.config import ModelConfig
from drt_jax.layers import MLP, ChunkEncoder, RMSNorm, apply_rope
from pallas_kernels import grouped_cross_attention


class InferenceError(ValueError):
    """A request the inference engine cannot serve (bad prompt, capacity exceeded, ...)."""


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class DeviceState:
    ring_k: jax.Array
    ring_v: jax.Array
    chunk_buf: Any = None
    mem_lmk: Any = None
    mem_k: Any = None
    mem_v: Any = None
    ret_idx: Any = None
    ret_w: Any = None
    ret_k: Any = None
    ret_v: Any = None


class HostMemory:
    """Chunk K/V in host memory (numpy), [B, capacity, S, Hkv, Dh] each.

    Append-only: rows < n_chunks of a state are never rewritten, so an older InferenceState that
    shares this object still sees exactly its own memory (rows past its n_chunks are invisible to it).
    """

    def __init__(self, k: np.ndarray, v: np.ndarray):
        self.k, self.v = k, v

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def write(self, start: int, k, v) -> None:
        k, v = np.asarray(jax.device_get(k)), np.asarray(jax.device_get(v))
        self.k[:, start : start + k.shape[1]] = k
        self.v[:, start : start + v.shape[1]] = v

    def gather(self, indices: np.ndarray):
        """indices [B, ...] global chunk ids (-1 = empty) -> (k, v) [B, ..., S, Hkv, Dh] on the device."""
        idx = np.where(indices >= 0, indices, 0)
        b = np.arange(idx.shape[0]).reshape((-1,) + (1,) * (idx.ndim - 1))
        return jax.device_put(self.k[b, idx]), jax.device_put(self.v[b, idx])

    def grown(self, capacity: int) -> HostMemory:
        if capacity <= self.capacity:
            return self
        pad = [(0, 0), (0, capacity - self.capacity)] + [(0, 0)] * (self.k.ndim - 2)
        return HostMemory(np.pad(self.k, pad), np.pad(self.v, pad))

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclasses.dataclass(frozen=True)
class InferenceState:
    dev: DeviceState
    pos: int = 0
    ntok: int = 0
    n_chunks: int = 0
    host: HostMemory | None = None

    def device_bytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self.dev))

    def device_arrays(self) -> dict[str, tuple]:
        return {f.name: getattr(self.dev, f.name).shape for f in dataclasses.fields(self.dev)
                if getattr(self.dev, f.name) is not None}


# --------------------------------------------------------------------------------------------------
# Functional pieces of the layers, applied to parameter sub-trees
# --------------------------------------------------------------------------------------------------


def _dense(cfg: ModelConfig, features, axis=-1):
    return nn.DenseGeneral(features, axis=axis, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                           param_dtype=jnp.dtype(cfg.param_dtype))


def _norm(p, x, eps, dtype):
    return RMSNorm(eps, dtype).apply({"params": p}, x)


def _layer_names(cfg: ModelConfig) -> list[str]:
    if not cfg.uses_retrieval:
        return [f"lower_{i}" for i in range(cfg.n_layers)]
    names = [f"lower_{i}" for i in range(cfg.n_lower)]
    for g, n in enumerate(cfg.groups):
        names += [f"group{g}_layer_{i}" for i in range(n)]
    return names


def _qkv(cfg, p, x, positions):
    H, Hkv, Dh = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    q = _dense(cfg, (H, Dh)).apply({"params": p["q"]}, x)
    k = _dense(cfg, (Hkv, Dh)).apply({"params": p["k"]}, x)
    v = _dense(cfg, (Hkv, Dh)).apply({"params": p["v"]}, x)
    if cfg.position == "rope":
        q, k = apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)
    return q, k, v


def _slopes(cfg):
    return alibi_slopes(cfg.n_heads) if cfg.position == "alibi" else None


def ring_positions(p_last, R: int):
    """Absolute slot held by each ring entry once slots .. p_last are written ([R], -ve = empty)."""
    r = jnp.arange(R)
    return p_last - jnp.mod(p_last - r, R)


def ring_attention(q, ring_k, ring_v, q_pos, k_pos, *, window, slopes):
    """q [B, n, H, D] at absolute slots q_pos [n] over ring keys at absolute slots k_pos [R]."""
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
    pr = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", pr.astype(ring_v.dtype), ring_v, preferred_element_type=jnp.float32)
    return out.reshape(B, n, H, D).astype(q.dtype)


def _attn_out(cfg, p, out):
    return _dense(cfg, cfg.d_model, axis=(-2, -1)).apply({"params": p["o"]}, out)


def _sa_decode(cfg, p, x, pos, ring_k, ring_v, R):
    """Self-attention of n new slots starting at `pos` against the ring; returns (out, ring_k, ring_v)."""
    n = x.shape[1]
    q_pos = pos + jnp.arange(n)
    q, k, v = _qkv(cfg, p, x, q_pos)
    slot = jnp.mod(q_pos, R)
    ring_k = ring_k.at[:, slot].set(k.astype(ring_k.dtype))
    ring_v = ring_v.at[:, slot].set(v.astype(ring_v.dtype))
    k_pos = ring_positions(pos + n - 1, R)
    out = ring_attention(q, ring_k, ring_v, q_pos, k_pos, window=cfg.window, slopes=_slopes(cfg))
    return _attn_out(cfg, p, out), ring_k, ring_v


def _sa_segment(cfg, p, x, pos, ring_k, ring_v, R, prefix: int):
    """Self-attention of a segment of L slots starting at `pos`, seeing the `prefix` previous slots
    through the ring (prefix == min(pos, window); 0 on a fresh state)."""
    L = x.shape[1]
    q_pos = pos + jnp.arange(L)
    q, k, v = _qkv(cfg, p, x, q_pos)
    if prefix:
        pre = jnp.mod(pos - prefix + jnp.arange(prefix), R)
        kk = jnp.concatenate([ring_k[:, pre].astype(k.dtype), k], axis=1)
        vv = jnp.concatenate([ring_v[:, pre].astype(v.dtype), v], axis=1)
        qq = jnp.concatenate([jnp.zeros((q.shape[0], prefix) + q.shape[2:], q.dtype), q], axis=1)
        out = causal_attention(qq, kk, vv, window=cfg.window, slopes=_slopes(cfg), impl=cfg.attention_impl)[:, prefix:]
    else:
        out = causal_attention(q, k, v, window=cfg.window, slopes=_slopes(cfg), impl=cfg.attention_impl)
    keep = min(L, R)
    slot = jnp.mod(q_pos[L - keep :], R)
    ring_k = ring_k.at[:, slot].set(k[:, L - keep :].astype(ring_k.dtype))
    ring_v = ring_v.at[:, slot].set(v[:, L - keep :].astype(ring_v.dtype))
    return _attn_out(cfg, p, out), ring_k, ring_v


def _gca(cfg, p, a, k_mem, v_mem, indices, weights, slots_per_query_chunk):
    """a [B, C*Sq, d]; indices/weights [B, C, K] into k_mem/v_mem [B, M, S, Hkv, Dh]."""
    B, L, _ = a.shape
    C = L // slots_per_query_chunk
    x = _norm(p["norm"], a, cfg.norm_eps, cfg.dtype)
    q = _dense(cfg, (cfg.n_heads, cfg.head_dim)).apply({"params": p["q"]}, x)
    q = q.reshape(B, C, slots_per_query_chunk, cfg.n_heads, cfg.head_dim)
    out = grouped_cross_attention(q, k_mem.astype(q.dtype), v_mem.astype(q.dtype), indices,
                                  weights.astype(q.dtype), softmax_off_by_one=cfg.gca_off_by_one,
                                  impl=cfg.gca_impl)
    return _attn_out(cfg, p, out.reshape(B, L, cfg.n_heads, cfg.head_dim))


def _mlp(cfg, p, x):
    return MLP(cfg).apply({"params": p}, x)


def _block(cfg, p, h, attn_fn, gca_fn=None):
    """Lower layer (gca_fn None) or upper layer with the authors' / standard residual wiring."""
    out, rk, rv = attn_fn(p["attn"], _norm(p["attn_norm"], h, cfg.norm_eps, cfg.dtype))
    a = h + out
    if gca_fn is None:
        return a + _mlp(cfg, p["mlp"], _norm(p["mlp_norm"], a, cfg.norm_eps, cfg.dtype)), rk, rv
    b = a + gca_fn(p["gca"], a)
    base = a if cfg.gca_residual == "authors" else b
    return base + _mlp(cfg, p["mlp"], _norm(p["mlp_norm"], b, cfg.norm_eps, cfg.dtype)), rk, rv


def _embed(cfg, params, slots):
    emb = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    return emb.apply({"params": params["embed"]}, slots)


def _logits(cfg, params, h):
    h = _norm(params["final_norm"], h, cfg.norm_eps, cfg.dtype)
    emb = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    return emb.apply({"params": params["embed"]}, h, method="attend").astype(jnp.float32)


def _retrieve(cfg, params, g, h_lmk, mem_lmk, query_offset):
    """h_lmk [B, C, d] landmark states entering group g -> top-k (indices, weights) [B, C, K]."""
    query = _norm(params[f"landmark_norm_g{g}"], h_lmk, cfg.norm_eps, "float32")
    scores = retrieval.landmark_scores(query, mem_lmk.astype(jnp.float32))
    return retrieval.causal_topk(scores, cfg.top_k, query_offset=query_offset)


def _device_gather(mem, idx):
    """mem [B, M, ...], idx [B, ...] (-1 = empty) -> [B, ..., ...]."""
    safe = jnp.where(idx >= 0, idx, 0)
    return jax.vmap(lambda m, i: m[i])(mem, safe)


def _local_indices(idx):
    """Global ids [B, C, K] of a gathered [B, C*K] memory -> local ids (c*K + j, -1 kept)."""
    B, C, K = idx.shape
    local = (jnp.arange(C)[:, None] * K + jnp.arange(K)[None, :])[None]
    return jnp.where(idx >= 0, local, -1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# Jitted step functions (pure: (params, DeviceState, ...) -> (..., DeviceState))
# --------------------------------------------------------------------------------------------------


def _decode_step(params, dev: DeviceState, tokens, pos, n_chunks, *, cfg: ModelConfig, R: int,
                 boundary: bool, offload: bool):
    """tokens [B] at slot `pos`; with `boundary` the chunk's landmark slot follows the token."""
    B = tokens.shape[0]
    slots = tokens[:, None].astype(jnp.int32)
    if boundary:
        slots = jnp.concatenate([slots, jnp.full((B, 1), cfg.landmark_id, jnp.int32)], axis=1)
    slots = jnp.where(slots < 0, cfg.pad_id, slots)
    n = slots.shape[1]
    h = _embed(cfg, params, slots)
    names = _layer_names(cfg)
    ring_k, ring_v = dev.ring_k, dev.ring_v
    n_plain = cfg.n_lower if cfg.uses_retrieval else cfg.n_layers

    def run(layer, h, gca_fn=None):
        nonlocal ring_k, ring_v
        attn = lambda p, x: _sa_decode(cfg, p, x, pos, ring_k[layer], ring_v[layer], R)
        h, rk, rv = _block(cfg, params[names[layer]], h, attn, gca_fn)
        ring_k, ring_v = ring_k.at[layer].set(rk), ring_v.at[layer].set(rv)
        return h

    for layer in range(n_plain):
        h = run(layer, h)
    if not cfg.uses_retrieval:
        logits = _logits(cfg, params, h[:, 0])
        return logits, dev.replace(ring_k=ring_k, ring_v=ring_v), None

    S1 = cfg.slots_per_chunk
    buf = jax.lax.dynamic_update_slice_in_dim(dev.chunk_buf, h.astype(dev.chunk_buf.dtype), jnp.mod(pos, S1), axis=1)
    mem_lmk, mem_k, mem_v = dev.mem_lmk, dev.mem_k, dev.mem_v
    new_kv = None
    if boundary:
        lmk, k_new, v_new = ChunkEncoder(cfg).apply({"params": params["encoder"]}, buf)
        mem_lmk = jax.lax.dynamic_update_slice_in_dim(mem_lmk, lmk.astype(mem_lmk.dtype), n_chunks, axis=1)
        if offload:
            new_kv = (k_new, v_new)
        else:
            mem_k = jax.lax.dynamic_update_slice_in_dim(mem_k, k_new.astype(mem_k.dtype), n_chunks, axis=1)
            mem_v = jax.lax.dynamic_update_slice_in_dim(mem_v, v_new.astype(mem_v.dtype), n_chunks, axis=1)

    K = cfg.top_k
    local = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (B, K))
    ret_idx, ret_w, ret_k, ret_v = dev.ret_idx, dev.ret_w, dev.ret_k, dev.ret_v
    new_idx, new_w = [], []
    layer = n_plain
    for g, n_layers in enumerate(cfg.groups):
        if boundary:
            i_g, w_g = _retrieve(cfg, params, g, h[:, -1:], mem_lmk, n_chunks)
            new_idx.append(i_g[:, 0])
            new_w.append(w_g[:, 0])
        idx_l = jnp.where(dev.ret_idx[g] >= 0, local, -1)[:, None]
        w_l = dev.ret_w[g][:, None]
        gca_fn = lambda p, a, g=g, idx_l=idx_l, w_l=w_l: _gca(cfg, p, a, dev.ret_k[g], dev.ret_v[g], idx_l, w_l, n)
        for _ in range(n_layers):
            h = run(layer, h, gca_fn)
            layer += 1
    if boundary:
        ret_idx, ret_w = jnp.stack(new_idx), jnp.stack(new_w)
        if not offload:
            ret_k = jnp.stack([_device_gather(mem_k, ret_idx[g]) for g in range(len(cfg.groups))]).astype(ret_k.dtype)
            ret_v = jnp.stack([_device_gather(mem_v, ret_idx[g]) for g in range(len(cfg.groups))]).astype(ret_v.dtype)
    logits = _logits(cfg, params, h[:, 0])
    dev = dev.replace(ring_k=ring_k, ring_v=ring_v, chunk_buf=buf, mem_lmk=mem_lmk, mem_k=mem_k, mem_v=mem_v,
                      ret_idx=ret_idx, ret_w=ret_w, ret_k=ret_k, ret_v=ret_v)
    return logits, dev, new_kv


def _segment_lower(params, dev: DeviceState, slots, pos, n_chunks, *, cfg, R, prefix, offload):
    """Embedding + lower layers (+ chunk encoder for DRT) of a segment of whole chunks."""
    slots = jnp.where(slots < 0, cfg.pad_id, slots).astype(jnp.int32)
    h = _embed(cfg, params, slots)
    names = _layer_names(cfg)
    ring_k, ring_v = dev.ring_k, dev.ring_v
    n_plain = cfg.n_lower if cfg.uses_retrieval else cfg.n_layers
    for layer in range(n_plain):
        attn = lambda p, x, rk=ring_k[layer], rv=ring_v[layer]: _sa_segment(cfg, p, x, pos, rk, rv, R, prefix)
        h, rk, rv = _block(cfg, params[names[layer]], h, attn)
        ring_k, ring_v = ring_k.at[layer].set(rk), ring_v.at[layer].set(rv)
    dev = dev.replace(ring_k=ring_k, ring_v=ring_v)
    new_kv = None
    if cfg.uses_retrieval:
        lmk, k_new, v_new = ChunkEncoder(cfg).apply({"params": params["encoder"]}, h)
        mem_lmk = jax.lax.dynamic_update_slice_in_dim(dev.mem_lmk, lmk.astype(dev.mem_lmk.dtype), n_chunks, axis=1)
        dev = dev.replace(mem_lmk=mem_lmk)
        if offload:
            new_kv = (k_new, v_new)
        else:
            dev = dev.replace(
                mem_k=jax.lax.dynamic_update_slice_in_dim(dev.mem_k, k_new.astype(dev.mem_k.dtype), n_chunks, axis=1),
                mem_v=jax.lax.dynamic_update_slice_in_dim(dev.mem_v, v_new.astype(dev.mem_v.dtype), n_chunks, axis=1),
            )
    return h, dev, new_kv


def _segment_retrieve(params, dev: DeviceState, h, n_chunks, *, cfg, g):
    """Group g's retrieval for every chunk of the segment -> consumer (indices, weights) [B, C, K]
    (chunk i reads row i-1; chunk 0 reads the previous segment's last retrieval) and the last row."""
    h_lmk = chunking.landmark_states(h, cfg.chunk_size)
    rows_i, rows_w = _retrieve(cfg, params, g, h_lmk, dev.mem_lmk, n_chunks)
    idx = jnp.concatenate([dev.ret_idx[g][:, None], rows_i[:, :-1]], axis=1)
    w = jnp.concatenate([dev.ret_w[g][:, None], rows_w[:, :-1]], axis=1)
    return idx, w, rows_i[:, -1], rows_w[:, -1]


def _segment_group(params, dev: DeviceState, h, pos, k_mem, v_mem, idx, w, *, cfg, R, prefix, g):
    """Runs group g's upper layers over a segment with GCA indices into k_mem / v_mem."""
    names = _layer_names(cfg)
    first = cfg.n_lower + sum(cfg.groups[:g])
    ring_k, ring_v = dev.ring_k, dev.ring_v
    gca_fn = lambda p, a: _gca(cfg, p, a, k_mem, v_mem, idx, w, cfg.slots_per_chunk)
    for layer in range(first, first + cfg.groups[g]):
        attn = lambda p, x, rk=ring_k[layer], rv=ring_v[layer]: _sa_segment(cfg, p, x, pos, rk, rv, R, prefix)
        h, rk, rv = _block(cfg, params[names[layer]], h, attn, gca_fn)
        ring_k, ring_v = ring_k.at[layer].set(rk), ring_v.at[layer].set(rv)
    return h, dev.replace(ring_k=ring_k, ring_v=ring_v)


def _segment_device(params, dev: DeviceState, slots, pos, n_chunks, *, cfg, R, prefix, all_logits):
    """A whole segment with the chunk memory on the device (one jit)."""
    h, dev, _ = _segment_lower(params, dev, slots, pos, n_chunks, cfg=cfg, R=R, prefix=prefix, offload=False)
    if cfg.uses_retrieval:
        last_i, last_w = [], []
        for g in range(len(cfg.groups)):
            idx, w, li, lw = _segment_retrieve(params, dev, h, n_chunks, cfg=cfg, g=g)
            h, dev = _segment_group(params, dev, h, pos, dev.mem_k, dev.mem_v, idx, w, cfg=cfg, R=R, prefix=prefix, g=g)
            last_i.append(li)
            last_w.append(lw)
        ret_idx, ret_w = jnp.stack(last_i), jnp.stack(last_w)
        dev = dev.replace(
            ret_idx=ret_idx, ret_w=ret_w,
            ret_k=jnp.stack([_device_gather(dev.mem_k, i) for i in ret_idx]).astype(dev.ret_k.dtype),
            ret_v=jnp.stack([_device_gather(dev.mem_v, i) for i in ret_idx]).astype(dev.ret_v.dtype),
        )
    return _segment_logits(params, h, cfg=cfg, all_logits=all_logits), dev


def _segment_logits(params, h, *, cfg, all_logits):
    if cfg.uses_retrieval:
        B, L, d = h.shape
        h = chunking.remove_landmarks(h, cfg.chunk_size, (L // cfg.slots_per_chunk) * cfg.chunk_size)
    return _logits(cfg, params, h if all_logits else h[:, -1])


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _compiled(fn, donate: bool, **static):
    """One jitted function per (step function, static arguments), shared by every engine with the same
    config, so building a second engine (e.g. offload on/off, a new batch of prompts) compiles nothing."""
    return jax.jit(functools.partial(fn, **static), donate_argnums=(1,) if donate else ())


class InferenceEngine:
    """Holds a model's config, parameters and compiled steps; all state is passed explicitly.

    cfg, params: a ModelConfig and its parameter tree (boxed or plain).
    batch_size: sequences decoded in lockstep.
    max_chunks: initial chunk-memory capacity (default: one block); grown in blocks of
      `memory_block` chunks when needed (one recompile per growth).
    offload: "host" keeps chunk K/V in host memory (numpy); only landmark keys stay on the device and
      only the top-k chunks per group are copied over at each retrieval. None keeps all on the device.
    segment_chunks: chunks per prefill segment (device memory of prefill is bounded by it); the swa
      baseline's segments hold as many tokens (segment_chunks * chunk_size).
    max_len: for arch="full", the KV-cache capacity in tokens (required there).
    """

    def __init__(self, cfg: ModelConfig, params, *, batch_size: int = 1, max_chunks: int | None = None,
                 memory_block: int = 1024, offload: str | None = None, segment_chunks: int = 256,
                 max_len: int | None = None, donate: bool = True):
        if offload not in (None, "none", "host"):
            raise InferenceError(f"offload={offload!r}: choose None or 'host'")
        self.cfg = cfg
        self.params = nn.unbox(params)
        if "params" in self.params and "embed" not in self.params:
            self.params = self.params["params"]
        self.B = batch_size
        self.offload = offload == "host" and cfg.uses_retrieval
        self.memory_block = max(1, memory_block)
        self.initial_chunks = max_chunks if max_chunks is not None else self.memory_block
        if cfg.arch == "full":
            if max_len is None:
                raise InferenceError("arch='full' needs max_len (the KV-cache capacity in tokens)")
            self.R = max_len
        else:
            self.R = cfg.window + 2
        self.segment_chunks = segment_chunks
        self.dtype = jnp.dtype(cfg.dtype)
        self.donate = donate
        self._decode = {
            boundary: _compiled(_decode_step, donate, cfg=cfg, R=self.R, boundary=boundary, offload=self.offload)
            for boundary in (False, True)
        }

    # ---- state -----------------------------------------------------------------------------------
    def init_state(self, max_chunks: int | None = None) -> InferenceState:
        cfg, B, dt = self.cfg, self.B, self.dtype
        NL = len(_layer_names(cfg))
        Hkv, Dh = cfg.kv_heads, cfg.head_dim
        ring = jnp.zeros((NL, B, self.R, Hkv, Dh), dt)
        if not cfg.uses_retrieval:
            return InferenceState(DeviceState(ring_k=ring, ring_v=jnp.zeros_like(ring)))
        E = self._round_capacity(max_chunks or self.initial_chunks)
        G, K, S = len(cfg.groups), cfg.top_k, cfg.chunk_size
        dev = DeviceState(
            ring_k=ring, ring_v=jnp.zeros_like(ring),
            chunk_buf=jnp.zeros((B, cfg.slots_per_chunk, cfg.d_model), dt),
            mem_lmk=jnp.zeros((B, E, cfg.d_model), dt),
            ret_idx=jnp.full((G, B, K), -1, jnp.int32), ret_w=jnp.zeros((G, B, K), jnp.float32),
            ret_k=jnp.zeros((G, B, K, S, Hkv, Dh), dt), ret_v=jnp.zeros((G, B, K, S, Hkv, Dh), dt),
        )
        host = None
        if self.offload:
            np_dt = np.dtype(dt)
            host = HostMemory(np.zeros((B, E, S, Hkv, Dh), np_dt), np.zeros((B, E, S, Hkv, Dh), np_dt))
        else:
            dev = dev.replace(mem_k=jnp.zeros((B, E, S, Hkv, Dh), dt), mem_v=jnp.zeros((B, E, S, Hkv, Dh), dt))
        return InferenceState(dev, host=host)

    def _round_capacity(self, n: int) -> int:
        return max(1, math.ceil(n / self.memory_block)) * self.memory_block

    def capacity(self, state: InferenceState) -> int:
        return state.dev.mem_lmk.shape[1] if self.cfg.uses_retrieval else 0

    def ensure_capacity(self, state: InferenceState, n_chunks: int) -> InferenceState:
        """Grows the chunk memory (in blocks) so it can hold n_chunks chunks."""
        if not self.cfg.uses_retrieval or n_chunks <= self.capacity(state):
            return state
        E = self._round_capacity(n_chunks)
        grow = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, E - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
        dev = state.dev.replace(mem_lmk=grow(state.dev.mem_lmk), mem_k=grow(state.dev.mem_k), mem_v=grow(state.dev.mem_v))
        host = state.host.grown(E) if state.host is not None else None
        return dataclasses.replace(state, dev=dev, host=host)

    # ---- decoding --------------------------------------------------------------------------------
    def step(self, state: InferenceState, tokens) -> tuple[jax.Array, InferenceState]:
        """Feeds one token per sequence ([B] ints); returns next-token logits [B, V] (float32)."""
        cfg = self.cfg
        tokens = jnp.asarray(tokens, jnp.int32).reshape(self.B)
        if cfg.arch == "full" and state.pos + 1 > self.R:
            raise InferenceError(f"context of {state.pos + 1} tokens exceeds max_len={self.R}")
        boundary = cfg.uses_retrieval and (state.ntok + 1) % cfg.chunk_size == 0
        if boundary:
            state = self.ensure_capacity(state, state.n_chunks + 1)
        logits, dev, new_kv = self._decode[boundary](self.params, state.dev, tokens, jnp.int32(state.pos),
                                                    jnp.int32(state.n_chunks))
        n_chunks = state.n_chunks + int(boundary)
        if boundary and self.offload:
            state.host.write(state.n_chunks, *new_kv)
            dev = self._host_refresh(dev, state.host)
        new = InferenceState(dev, pos=state.pos + 1 + int(boundary), ntok=state.ntok + 1, n_chunks=n_chunks,
                             host=state.host)
        return logits, new

    def _host_refresh(self, dev: DeviceState, host: HostMemory) -> DeviceState:
        """Offload: copies the top-k chunks of every group's current retrieval to the device."""
        idx = np.asarray(jax.device_get(dev.ret_idx))  # [G, B, K]
        ks, vs = zip(*(host.gather(i) for i in idx), strict=False)
        return dev.replace(ret_k=jnp.stack(ks).astype(self.dtype), ret_v=jnp.stack(vs).astype(self.dtype))

    # ---- prefill ---------------------------------------------------------------------------------
    def prefill(self, state: InferenceState, tokens, *, all_logits: bool = False, progress=None):
        """Feeds a prompt [B, T] (any T >= 1). Returns (logits, state): logits [B, V] of the last token,
        or with all_logits [B, T, V] for every token (testing; memory grows with T)."""
        cfg = self.cfg
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.shape[0] != self.B or tokens.shape[1] < 1:
            raise InferenceError(f"prompt shape {tokens.shape} does not match batch {self.B} x T>=1")
        T = tokens.shape[1]
        outs = []
        t = 0
        if cfg.uses_retrieval:
            state = self.ensure_capacity(state, state.n_chunks + -(-T // cfg.chunk_size) + 1)
            # Finish an open chunk token by token, so segments start on chunk boundaries.
            while t < T and state.ntok % cfg.chunk_size:
                lg, state = self.step(state, tokens[:, t])
                outs.append(lg[:, None])
                t += 1
            unit = cfg.chunk_size
        else:
            unit = 1
        if cfg.arch == "full":
            if state.pos + T > self.R:
                raise InferenceError(f"context of {state.pos + T} tokens exceeds max_len={self.R}")
            seg_tokens = T  # one segment: full attention over the whole prompt
            if state.pos:
                raise InferenceError("arch='full' prefills a fresh state only")
        else:
            # Not 1-token units for swa: 256-token segments made its 1M-token prefill 4,096 calls.
            seg_tokens = self.segment_chunks * cfg.chunk_size
        while T - t >= unit:
            n = min(seg_tokens, ((T - t) // unit) * unit)
            lg, state = self._segment(state, tokens[:, t : t + n], all_logits)
            outs.append(lg if all_logits else lg[:, None])
            t += n
            if progress is not None:
                progress(n)
        while t < T:
            lg, state = self.step(state, tokens[:, t])
            outs.append(lg[:, None])
            t += 1
        if all_logits:
            return jnp.concatenate(outs, axis=1), state
        return outs[-1][:, -1], state

    def _jit(self, fn, donate=None, **static):
        return _compiled(fn, self.donate if donate is None else donate, cfg=self.cfg, **static)

    def _segment(self, state: InferenceState, tokens: np.ndarray, all_logits: bool):
        cfg = self.cfg
        B, n = tokens.shape
        tok = jnp.asarray(tokens)
        if cfg.uses_retrieval:
            slots = chunking.insert_landmarks(tok, cfg.chunk_size, cfg.landmark_id, cfg.pad_id)
        else:
            slots = tok
        L = slots.shape[1]
        prefix = min(state.pos, cfg.window) if cfg.window is not None else 0
        pos, E0 = jnp.int32(state.pos), jnp.int32(state.n_chunks)
        C = L // cfg.slots_per_chunk if cfg.uses_retrieval else 0
        if not self.offload:
            fn = self._jit(_segment_device, R=self.R, prefix=prefix, all_logits=all_logits)
            logits, dev = fn(self.params, state.dev, slots, pos, E0)
            return logits, InferenceState(dev, pos=state.pos + L, ntok=state.ntok + n, n_chunks=state.n_chunks + C,
                                          host=state.host)
        # Offload: a jit per stage, with host gathers of the retrieved chunks in between.
        lower = self._jit(_segment_lower, R=self.R, prefix=prefix, offload=True)
        h, dev, (k_new, v_new) = lower(self.params, state.dev, slots, pos, E0)
        state.host.write(state.n_chunks, k_new, v_new)
        del k_new, v_new
        last_i, last_w = [], []
        for g in range(len(cfg.groups)):
            idx, w, li, lw = self._jit(_segment_retrieve, donate=False, g=g)(self.params, dev, h, E0)
            idx_np = np.asarray(jax.device_get(idx))
            k_sel, v_sel = state.host.gather(idx_np.reshape(B, -1))  # [B, C*K, S, Hkv, Dh]
            group = self._jit(_segment_group, R=self.R, prefix=prefix, g=g)
            h, dev = group(self.params, dev, h, pos, k_sel, v_sel, _local_indices(idx), w)
            last_i.append(li)
            last_w.append(lw)
        dev = dev.replace(ret_idx=jnp.stack(last_i), ret_w=jnp.stack(last_w))
        dev = self._host_refresh(dev, state.host)
        logits = _compiled(_segment_logits, False, cfg=cfg, all_logits=all_logits)(self.params, h)
        return logits, InferenceState(dev, pos=state.pos + L, ntok=state.ntok + n, n_chunks=state.n_chunks + C,
                                      host=state.host)
