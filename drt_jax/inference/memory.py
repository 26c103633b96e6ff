"""The state of incremental inference and its chunk memory on the device.

DeviceState (a pytree, passed into the compiled steps and returned by them; E memory rows,
G retrieval groups, K top-k):
  cache: the model's "cache" collection (drt_jax.model): each decoder layer's ring of keys/values
    [B, R, Hkv, Dh] and the open chunk's lower states [B, S+1, d].
  mem_lmk [B, E, d]: landmark keys of the chunk memory, always on the device.
  mem_k / mem_v [B, E, S, Hkv, Dh]: the chunk memory's keys/values, or None when they are offloaded to
    the host (offload.HostMemory). Rows from n_chunks on are unused; retrieval never reads them
    (a chunk only sees earlier chunks).
  ret_idx / ret_w [G, B, K]: each group's current retrieval (global chunk ids, -1 = empty; weights),
    made by the last completed chunk's landmark, and ret_k / ret_v [G, B, K, S, Hkv, Dh] the chunks it
    names: every slot of the current chunk reads them through GCA.
InferenceState adds what the host keeps: slots, tokens and chunks consumed, and the host memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from drt_jax.config import ModelConfig


@struct.dataclass
class DeviceState:
    cache: Any
    mem_lmk: Any = None
    mem_k: Any = None
    mem_v: Any = None
    ret_idx: Any = None
    ret_w: Any = None
    ret_k: Any = None
    ret_v: Any = None


@dataclasses.dataclass(frozen=True)
class InferenceState:
    dev: DeviceState
    pos: int = 0
    ntok: int = 0
    n_chunks: int = 0
    host: Any = None  # offload.HostMemory when the chunk K/V live on the host

    def device_bytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self.dev))

    def device_arrays(self) -> dict[str, tuple]:
        """{path: shape} of every device array."""
        leaves = jax.tree_util.tree_flatten_with_path(self.dev)[0]
        return {jax.tree_util.keystr(path): x.shape for path, x in leaves}


def empty(cfg: ModelConfig, batch: int, capacity: int, *, offload: bool) -> DeviceState:
    """A fresh state without its cache (the model shapes that: see steps.empty_cache)."""
    if not cfg.uses_retrieval:
        return DeviceState(cache={})
    dt = jnp.dtype(cfg.dtype)
    G, K, S, Hkv, Dh = len(cfg.groups), cfg.top_k, cfg.chunk_size, cfg.kv_heads, cfg.head_dim
    dev = DeviceState(
        cache={},
        mem_lmk=jnp.zeros((batch, capacity, cfg.d_model), dt),
        ret_idx=jnp.full((G, batch, K), -1, jnp.int32), ret_w=jnp.zeros((G, batch, K), jnp.float32),
        ret_k=jnp.zeros((G, batch, K, S, Hkv, Dh), dt), ret_v=jnp.zeros((G, batch, K, S, Hkv, Dh), dt),
    )
    if offload:
        return dev
    return dev.replace(mem_k=jnp.zeros((batch, capacity, S, Hkv, Dh), dt), mem_v=jnp.zeros((batch, capacity, S, Hkv, Dh), dt))


def device_bytes(cfg: ModelConfig, batch: int, capacity: int, *, offload: bool) -> int:
    """Bytes of the chunk memory's device arrays at `capacity` rows (those of `empty`, without
    allocating them): landmark keys, and the K/V unless they are offloaded."""
    dev = jax.eval_shape(lambda: empty(cfg, batch, capacity, offload=offload))
    return sum(x.size * x.dtype.itemsize for x in (dev.mem_lmk, dev.mem_k, dev.mem_v) if x is not None)


def device_free_bytes() -> int | None:
    """Bytes the default device can still allocate (its allocator's limit less what is in use), or None
    where the backend does not say (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def grow(dev: DeviceState, capacity: int) -> DeviceState:
    """Pads the memory rows to `capacity` (the ring, retrieval and cache are unchanged)."""
    pad = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, capacity - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return dev.replace(mem_lmk=pad(dev.mem_lmk), mem_k=pad(dev.mem_k), mem_v=pad(dev.mem_v))


def append(dev: DeviceState, chunks, start, *, keep_kv: bool):
    """Writes encoded chunks (landmark keys [B, C, d], k, v [B, C, S, Hkv, Dh]) at memory row `start`.

    Returns (dev, (k, v)): with keep_kv the K/V go into dev.mem_k / mem_v and (k, v) is None; otherwise
    (offload) they are handed back for the host.
    """
    lmk, k, v = chunks
    write = lambda mem, x: jax.lax.dynamic_update_slice_in_dim(mem, x.astype(mem.dtype), start, axis=1)
    dev = dev.replace(mem_lmk=write(dev.mem_lmk, lmk))
    if not keep_kv:
        return dev, (k, v)
    return dev.replace(mem_k=write(dev.mem_k, k), mem_v=write(dev.mem_v, v)), None


def gather(mem, indices):
    """mem [B, E, ...], indices [B, ...] (-1 = empty) -> [B, ..., ...] (an empty slot reads row 0)."""
    safe = jnp.where(indices >= 0, indices, 0)
    return jax.vmap(lambda m, i: m[i])(mem, safe)


def local_indices(indices):
    """Global ids [B, C, K] of chunks gathered into [B, C*K] rows -> their rows c*K + j (-1 kept)."""
    _, C, K = indices.shape
    local = (jnp.arange(C)[:, None] * K + jnp.arange(K)[None, :])[None]
    return jnp.where(indices >= 0, local, -1).astype(jnp.int32)


def set_retrieval(dev: DeviceState, rows, *, fetch: bool) -> DeviceState:
    """rows: per group, the new retrieval (indices, weights) [B, K]. With fetch, its chunks are gathered
    from the device memory; otherwise (offload) the caller fetches them from the host."""
    idx = jnp.stack([i for i, _ in rows])
    dev = dev.replace(ret_idx=idx, ret_w=jnp.stack([w for _, w in rows]).astype(dev.ret_w.dtype))
    if not fetch:
        return dev
    ret_k = jnp.stack([gather(dev.mem_k, i) for i in idx]).astype(dev.ret_k.dtype)
    ret_v = jnp.stack([gather(dev.mem_v, i) for i in idx]).astype(dev.ret_v.dtype)
    return dev.replace(ret_k=ret_k, ret_v=ret_v)


def current_chunks(dev: DeviceState, g: int):
    """Group g's GCA inputs for the slots of the current chunk: (k_mem, v_mem [B, K, S, Hkv, Dh],
    indices, weights [B, 1, K]), the retrieved chunks held in their retrieval's order."""
    return dev.ret_k[g], dev.ret_v[g], local_indices(dev.ret_idx[g][:, None]), dev.ret_w[g][:, None]
