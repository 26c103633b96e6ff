"""Chunk memory in host RAM: only the landmark keys stay on the device, and only the chunks a retrieval
names travel to it.

A decode step that closes a chunk hands its K/V to the host and, after the step, the chunks of every
group's new retrieval are fetched (one transfer each way per chunk closed). A prefill segment runs as
separate compiled stages with the host in between: the lower stage writes the segment's chunks to the
host, then each group's retrieval names the chunks its layers need, which are fetched before the layers run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.inference import memory, steps
from drt_jax.inference.memory import DeviceState


class HostMemory:
    """Chunk K/V in host memory (numpy), [B, capacity, S, Hkv, Dh] each.

    Append-only: rows < n_chunks of a state are never rewritten, so an older InferenceState that
    shares this object still sees exactly its own memory (rows past its n_chunks are invisible to it).
    """

    def __init__(self, k: np.ndarray, v: np.ndarray):
        self.k, self.v = k, v

    @classmethod
    def zeros(cls, shape, dtype) -> HostMemory:
        return cls(np.zeros(shape, np.dtype(dtype)), np.zeros(shape, np.dtype(dtype)))

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


def fetch_retrieved(dev: DeviceState, host: HostMemory) -> DeviceState:
    """Copies the chunks named by every group's current retrieval (dev.ret_idx) from the host."""
    idx = np.asarray(jax.device_get(dev.ret_idx))  # [G, B, K]
    ks, vs = zip(*(host.gather(i) for i in idx), strict=True)
    return dev.replace(ret_k=jnp.stack(ks).astype(dev.ret_k.dtype), ret_v=jnp.stack(vs).astype(dev.ret_v.dtype))


def prefill_segment(params, dev: DeviceState, host: HostMemory, tokens, pos: int, n_chunks: int, *, cfg, R: int,
                    prefix: int, all_logits: bool, donate: bool):
    """A DRT prefill segment (whole chunks) with the chunk K/V on the host -> (logits, dev)."""
    B = tokens.shape[0]
    pos, start = jnp.int32(pos), jnp.int32(n_chunks)
    lower = steps.compiled(steps.segment_lower, donate, cfg=cfg, R=R, prefix=prefix, offload=True)
    h, dev, (k_new, v_new) = lower(params, dev, tokens, pos, start)
    host.write(n_chunks, k_new, v_new)
    del k_new, v_new
    last = []
    for g in range(len(cfg.groups)):
        idx, w, last_i, last_w = steps.compiled(steps.segment_retrieve, False, cfg=cfg, g=g)(params, dev, h, start)
        k_sel, v_sel = host.gather(np.asarray(jax.device_get(idx)).reshape(B, -1))  # [B, C*K, S, Hkv, Dh]
        group = steps.compiled(steps.segment_group, donate, cfg=cfg, R=R, prefix=prefix, g=g)
        h, dev = group(params, dev, h, pos, k_sel, v_sel, memory.local_indices(idx), w)
        last.append((last_i, last_w))
    dev = fetch_retrieved(memory.set_retrieval(dev, last, fetch=False), host)
    logits = steps.compiled(steps.segment_logits, False, cfg=cfg, all_logits=all_logits)(params, h)
    return logits, dev
