"""The compiled steps of incremental inference: the model's own methods (drt_jax.model.DRT.decode,
prefill_lower, retrieve, prefill_group, readout) with the chunk memory's writes and reads between them.

Every step is pure, (params, DeviceState, ...) -> (..., DeviceState), and is compiled once per
(step, static arguments) for the whole process (`compiled`). Positions and chunk counts are traced,
so a step never recompiles as the context grows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from drt_jax import chunking
from drt_jax.inference import memory
from drt_jax.inference.memory import DeviceState
from drt_jax.model import DRT


@functools.lru_cache(maxsize=256)
def compiled(fn, donate: bool, **static):
    """One jitted function per (step function, static arguments), shared by every engine with the same
    config, so building a second engine (e.g. offload on/off, a new batch of prompts) compiles nothing."""
    return jax.jit(functools.partial(fn, **static), donate_argnums=(1,) if donate else ())


def _apply(cfg, params, dev: DeviceState, method, *args, **kwargs):
    """An incremental model method on dev's cache -> (its result, dev with the updated cache)."""
    out, variables = DRT(cfg).apply({"params": params, "cache": dev.cache}, *args, method=method,
                                    mutable=["cache"], **kwargs)
    return out, dev.replace(cache=variables["cache"])


_CACHE_SHAPES: dict = {}


def empty_cache(cfg, params, dev: DeviceState, batch: int, R: int):
    """The model's cache of a fresh context (zeros), shaped by tracing a decode step on `dev` (no cache yet).

    The trace runs once per (config, batch, ring, offload): every fresh prompt starts from here, and
    tracing drt-133m costs about 0.3 s of host time, a third of a 1M-token prefill on an H100."""
    offload = dev.mem_k is None
    key = (cfg, batch, R, offload)
    if key not in _CACHE_SHAPES:
        step = functools.partial(decode_step, cfg=cfg, R=R, closes_chunk=False, offload=offload)
        _, traced, _ = jax.eval_shape(step, params, dev, jnp.zeros((batch,), jnp.int32), jnp.int32(0), jnp.int32(0))
        _CACHE_SHAPES[key] = traced.cache
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _CACHE_SHAPES[key])


def decode_step(params, dev: DeviceState, tokens, pos, n_chunks, *, cfg, R: int, closes_chunk: bool, offload: bool):
    """tokens [B] at slot `pos` -> (logits [B, V] float32, dev, the finished chunk's (k, v) for the host
    when offloading and closing a chunk, else None)."""
    gca = [memory.current_chunks(dev, g) for g in range(len(cfg.groups))]
    (logits, finished, new), dev = _apply(cfg, params, dev, DRT.decode, tokens, pos, ring=R, closes_chunk=closes_chunk,
                                          gca=gca, memory_keys=dev.mem_lmk, chunks_done=n_chunks)
    host_kv = None
    if closes_chunk:
        dev, host_kv = memory.append(dev, finished, n_chunks, keep_kv=not offload)
        dev = memory.set_retrieval(dev, new, fetch=not offload)
    return logits.astype(jnp.float32), dev, host_kv


def segment_lower(params, dev: DeviceState, tokens, pos, n_chunks, *, cfg, R: int, prefix: int, offload: bool):
    """A segment's embedding and lower layers; DRT's chunks go into the memory -> (h, dev, host (k, v) or None)."""
    (h, chunks), dev = _apply(cfg, params, dev, DRT.prefill_lower, tokens, pos, ring=R, prefix=prefix)
    if chunks is None:
        return h, dev, None
    dev, host_kv = memory.append(dev, chunks, n_chunks, keep_kv=not offload)
    return h, dev, host_kv


def segment_retrieve(params, dev: DeviceState, h, n_chunks, *, cfg, g: int):
    """Group g's retrieval over a segment -> (indices, weights) [B, C, K] its chunks read (chunk c reads
    the row of chunk c - 1; chunk 0 the previous segment's last retrieval, dev.ret_*) and the last row."""
    idx, w = DRT(cfg).apply({"params": params}, g, h, dev.mem_lmk, n_chunks, method=DRT.retrieve)
    reads_i = jnp.concatenate([dev.ret_idx[g][:, None], idx[:, :-1]], axis=1)
    reads_w = jnp.concatenate([dev.ret_w[g][:, None], w[:, :-1]], axis=1)
    return reads_i, reads_w, idx[:, -1], w[:, -1]


def segment_group(params, dev: DeviceState, h, pos, k_mem, v_mem, idx, w, *, cfg, R: int, prefix: int, g: int):
    """Group g's upper layers over a segment, GCA reading k_mem / v_mem through idx / w -> (h, dev)."""
    return _apply(cfg, params, dev, DRT.prefill_group, g, h, pos, k_mem, v_mem, idx, w, ring=R, prefix=prefix)


def segment_memory(k_seg, v_seg, last, k_host, v_host, *, size: int):
    """The memory an offloaded segment's group reads: the segment's own chunks k_seg / v_seg
    [B, C, S, Hkv, Dh] (rows 0..C-1), the chunks fetched from the host k_host / v_host [B, U, S, Hkv, Dh]
    (rows C..C+U-1) and zero rows up to a fixed `size` (so the group step compiles once, whatever U is)
    -> (k_mem, v_mem [B, size, S, Hkv, Dh], and their rows `last` [B, K] (-1 = empty) [B, K, S, Hkv, Dh]:
    the chunks of the retrieval that the next chunk reads)."""

    def assemble(seg, fetched):
        pad = jnp.zeros((seg.shape[0], size - seg.shape[1] - fetched.shape[1]) + seg.shape[2:], fetched.dtype)
        # The segment's chunks in the host's dtype: the values a read from the host would give.
        return jnp.concatenate([seg.astype(fetched.dtype), fetched, pad], axis=1)

    k_mem, v_mem = assemble(k_seg, k_host), assemble(v_seg, v_host)
    return k_mem, v_mem, memory.gather(k_mem, last), memory.gather(v_mem, last)


def segment_logits(params, h, *, cfg, all_logits: bool):
    """Logits (float32) of a segment's tokens [B, T, V], or of its last token [B, V]."""
    if cfg.uses_retrieval:
        C = h.shape[1] // cfg.slots_per_chunk
        h = chunking.remove_landmarks(h, cfg.chunk_size, C * cfg.chunk_size)
    h = h if all_logits else h[:, -1]
    return DRT(cfg).apply({"params": params}, h, method=DRT.readout).astype(jnp.float32)


def segment_device(params, dev: DeviceState, tokens, pos, n_chunks, *, cfg, R: int, prefix: int, all_logits: bool):
    """A whole segment with the chunk memory on the device, as one compiled step -> (logits, dev)."""
    h, dev, _ = segment_lower(params, dev, tokens, pos, n_chunks, cfg=cfg, R=R, prefix=prefix, offload=False)
    if cfg.uses_retrieval:
        last = []
        for g in range(len(cfg.groups)):
            idx, w, last_i, last_w = segment_retrieve(params, dev, h, n_chunks, cfg=cfg, g=g)
            h, dev = segment_group(params, dev, h, pos, dev.mem_k, dev.mem_v, idx, w, cfg=cfg, R=R, prefix=prefix, g=g)
            last.append((last_i, last_w))
        dev = memory.set_retrieval(dev, last, fetch=True)
    return segment_logits(params, h, cfg=cfg, all_logits=all_logits), dev
