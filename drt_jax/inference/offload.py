"""Chunk memory in host RAM: only the landmark keys stay on the device, and only the chunks a retrieval
names travel to it.

A decode step that closes a chunk hands its K/V to the host and, after the step, the chunks of every
group's new retrieval are fetched (one transfer each way per chunk closed).

A prefill segment runs as separate compiled stages with the host in between. The lower stage encodes the
segment's C chunks; their K/V go to the host in the background (nothing in the segment reads them from
there). Each group's retrieval then names C*K chunks (and K more for the next chunk), often the same
chunk for many neighbouring chunks, and some of them the segment's own, which are still on the device:
the host sends only the distinct chunks written before the segment, once each, and the device puts them
next to the segment's own chunks in one memory that the group's layers read through remapped indices.
Sending all C*K named chunks (2,048, 200 MB for drt-20m), gathered by one thread into fresh arrays, made
an offloaded segment ten times slower than one on the device.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.inference import memory, steps
from drt_jax.inference.memory import DeviceState

# Host-side copies (gathers into the staging buffers, writes of a segment's chunks) run on these threads:
# numpy releases the GIL while copying, and one thread does not reach the host's memory bandwidth.
_WORKERS = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="drt-host-memory")
_PIECE_BYTES = 8 << 20  # a gather is split into pieces of about this size, one worker each


def fetch_rows(n: int, cap: int) -> int:
    """Rows to send for n distinct chunks: 0, a power of two from 16 to 256, then a multiple of 256, at
    most cap. Bounds the shapes a segment compiles (one small assembling step each) to about a dozen, at
    the cost of sending at most 255 padding rows (which are not copied on the host)."""
    if n == 0:
        return 0
    rows = max(16, 1 << (n - 1).bit_length()) if n <= 256 else -(-n // 256) * 256
    return min(rows, cap)


def plan_reads(ids: np.ndarray, start: int, C: int, cap: int):
    """What a segment's group fetches from the host, and where each read lands in the memory it reads.

    ids [B, N, K]: global chunk ids (-1 = empty) that the segment reads; its own C chunks are
      start..start+C-1 (still on the device), earlier ones are on the host.
    Returns rows [B, U]: per batch row the distinct host ids in ascending order, then -1 (U = fetch_rows
    of the most distinct ids of a row, at most cap); and local [B, N, K] int32: each id's row in the
    memory [the segment's C chunks; the U fetched chunks] (own chunk j -> j - start, host chunk
    rows[b, u] -> C + u, -1 kept).
    """
    B = ids.shape[0]
    on_host = (ids >= 0) & (ids < start)
    distinct = [np.unique(ids[b][on_host[b]]) for b in range(B)]
    rows = np.full((B, fetch_rows(max(len(d) for d in distinct), cap)), -1, np.int64)
    local = np.where(ids >= start, ids - start, -1)
    for b, d in enumerate(distinct):
        rows[b, : len(d)] = d
        local[b][on_host[b]] = C + np.searchsorted(d, ids[b][on_host[b]])
    return rows, local.astype(np.int32)


def _copy_rows(src: np.ndarray, rows: np.ndarray, valid: np.ndarray, dst: np.ndarray) -> list:
    """dst[b, :valid[b]] = src[b, rows[b, :valid[b]]] for src [B, E, ...], rows [B, U], dst [B, U, ...],
    in pieces of about _PIECE_BYTES, on the worker threads -> their futures."""
    per_piece = max(1, _PIECE_BYTES // max(1, src[0, 0].nbytes))
    # mode="clip" (the ids are in range anyway): with the default "raise", np.take buffers the output.
    take = lambda b, lo, hi: np.take(src[b], rows[b, lo:hi], axis=0, out=dst[b, lo:hi], mode="clip")
    return [_WORKERS.submit(take, b, lo, min(lo + per_piece, n))
            for b, n in enumerate(valid) for lo in range(0, n, per_piece)]


class HostMemory:
    """Chunk K/V in host memory (numpy), [B, capacity, S, Hkv, Dh] each.

    Append-only: rows < n_chunks of a state are never rewritten, so an older InferenceState that
    shares this object still sees exactly its own memory (rows past its n_chunks are invisible to it).
    A prefill segment's rows are written in the background (write_async); reading k / v, or a gather
    that needs those rows, waits for that write.
    """

    def __init__(self, k: np.ndarray, v: np.ndarray):
        self._k, self._v = k, v
        self._pending = None  # (first row, future) of the write in flight
        # Reused buffers that fetch gathers into, [N, S, Hkv, Dh] each (a fresh 100 MB array per fetch
        # costs as much again in page faults as the copy), and an array computed from their last contents.
        self._staging = None
        self._fence = None

    @classmethod
    def zeros(cls, shape, dtype) -> HostMemory:
        return cls(np.zeros(shape, np.dtype(dtype)), np.zeros(shape, np.dtype(dtype)))

    @property
    def k(self) -> np.ndarray:
        self.flush()
        return self._k

    @property
    def v(self) -> np.ndarray:
        self.flush()
        return self._v

    @property
    def capacity(self) -> int:
        return self._k.shape[1]

    @property
    def nbytes(self) -> int:
        return self._k.nbytes + self._v.nbytes

    # ---- writes ----------------------------------------------------------------------------------
    def write(self, start: int, k, v) -> None:
        """k, v [B, n, S, Hkv, Dh] (device or numpy) -> rows start..start+n-1."""
        self._check_rows(start, k.shape[1])
        self.flush()
        self._write(start, k, v)

    def write_async(self, start: int, k, v) -> None:
        """As write, for device arrays, without waiting: the copy to the host starts now and the rows are
        written by a worker thread."""
        self._check_rows(start, k.shape[1])
        self.flush()
        for x in (k, v):
            x.copy_to_host_async()
        self._pending = (start, _WORKERS.submit(self._write, start, k, v))

    def _check_rows(self, start: int, n: int) -> None:
        # numpy would drop rows past the end without a word (a one-row block broadcasts into an empty slice).
        if not (0 <= start and start + n <= self.capacity):
            raise IndexError(f"rows {start}..{start + n - 1} are outside the host memory's {self.capacity} rows")

    def _write(self, start: int, k, v) -> None:
        k, v = np.asarray(jax.device_get(k)), np.asarray(jax.device_get(v))
        self._k[:, start : start + k.shape[1]] = k
        self._v[:, start : start + v.shape[1]] = v

    def flush(self, below: int | None = None) -> None:
        """Waits for the write in flight (only if it writes a row < below, when given)."""
        if self._pending is not None and (below is None or self._pending[0] < below):
            _, done = self._pending
            self._pending = None
            done.result()

    # ---- reads -----------------------------------------------------------------------------------
    def gather(self, indices: np.ndarray):
        """indices [B, ...] global chunk ids (-1 = empty) -> (k, v) [B, ..., S, Hkv, Dh] on the device.
        For a few chunks (a decode step's retrieval): see fetch for a prefill segment's."""
        self.flush()
        idx = np.where(indices >= 0, indices, 0)
        b = np.arange(idx.shape[0]).reshape((-1,) + (1,) * (idx.ndim - 1))
        return jax.device_put(self._k[b, idx]), jax.device_put(self._v[b, idx])

    def fetch(self, rows: np.ndarray, use, *, most: int = 0):
        """rows [B, U] global chunk ids, distinct ones first, -1 (padding) after -> use(k, v), k and v
        [B, U, S, Hkv, Dh] on the device (padding rows hold stale data: nothing may read them).
        most: the largest U the caller will ask for, so that the staging is allocated once (a page is
        touched only when first used, whereas every reallocation pays the page faults again).

        The rows are copied by the worker threads into reused staging buffers, k's before v's so that k
        travels while v is copied. `use` is one compiled call that makes what the caller keeps from k and
        v (which may alias the staging: the CPU backend does not copy); the staging is refilled only once
        its result is ready, so neither a transfer in flight nor an aliasing array sees it change.
        """
        if rows.size:
            self.flush(below=int(rows.max()) + 1)
        B, U = rows.shape
        row_shape = self._k.shape[2:]
        if self._fence is not None:
            jax.block_until_ready(self._fence)
        if self._staging is None or self._staging[0].shape[0] < B * U:
            self._staging = tuple(np.empty((B * max(U, most),) + row_shape, self._k.dtype) for _ in range(2))
        k_buf, v_buf = (s[: B * U].reshape((B, U) + row_shape) for s in self._staging)
        valid = (rows >= 0).sum(axis=1)  # distinct ids first: padding rows are not copied
        k_copies, v_copies = (_copy_rows(src, rows, valid, dst) for src, dst in ((self._k, k_buf), (self._v, v_buf)))
        for done in k_copies:
            done.result()
        k = jax.device_put(k_buf)
        for done in v_copies:
            done.result()
        out = use(k, jax.device_put(v_buf))
        # An executable's outputs are ready together: waiting for the smallest means it is done reading
        # k and v, without keeping the large ones alive on the device until the next fetch.
        self._fence = min(jax.tree.leaves(out), key=lambda x: x.nbytes)
        return out

    def grown(self, capacity: int) -> HostMemory:
        if capacity <= self.capacity:
            return self
        pad = [(0, 0), (0, capacity - self.capacity)] + [(0, 0)] * (self._k.ndim - 2)
        return HostMemory(np.pad(self.k, pad), np.pad(self.v, pad))


def fetch_retrieved(dev: DeviceState, host: HostMemory) -> DeviceState:
    """Copies the chunks named by every group's current retrieval (dev.ret_idx) from the host."""
    idx = np.asarray(jax.device_get(dev.ret_idx))  # [G, B, K]
    ks, vs = zip(*(host.gather(i) for i in idx), strict=True)
    return dev.replace(ret_k=jnp.stack(ks).astype(dev.ret_k.dtype), ret_v=jnp.stack(vs).astype(dev.ret_v.dtype))


def prefill_segment(params, dev: DeviceState, host: HostMemory, tokens, pos: int, n_chunks: int, *, cfg, R: int,
                    prefix: int, all_logits: bool, donate: bool):
    """A DRT prefill segment (whole chunks) with the chunk K/V on the host -> (logits, dev)."""
    K = cfg.top_k
    pos, start = jnp.int32(pos), jnp.int32(n_chunks)
    lower = steps.compiled(steps.segment_lower, donate, cfg=cfg, R=R, prefix=prefix, offload=True)
    h, dev, (k_seg, v_seg) = lower(params, dev, tokens, pos, start)  # k_seg, v_seg [B, C, S, Hkv, Dh]
    C = k_seg.shape[1]
    host.write_async(n_chunks, k_seg, v_seg)
    # Each group reads at most (C + 1) * K host chunks (its C rows of reads and the next chunk's row);
    # with the segment's own C chunks that fixes the memory's rows, so the group step compiles once.
    cap = (C + 1) * K
    last, ret_k, ret_v = [], [], []
    for g in range(len(cfg.groups)):
        idx, w, last_i, last_w = steps.compiled(steps.segment_retrieve, False, cfg=cfg, g=g)(params, dev, h, start)
        # The one sync of the group: the host needs the ids to know what to send. Rows 0..C-1 are what
        # the segment's chunks read, row C what the next chunk (the next segment's first) will read.
        reads, next_reads = jax.device_get((idx, last_i))
        ids = np.concatenate([reads, next_reads[:, None]], axis=1)  # [B, C+1, K]
        rows, local = plan_reads(ids, n_chunks, C, cap)
        assemble = steps.compiled(steps.segment_memory, False, size=C + cap)
        # k_mem, v_mem [B, C + cap, S, Hkv, Dh]; k_last, v_last [B, K, S, Hkv, Dh] (row C's chunks)
        k_mem, v_mem, k_last, v_last = host.fetch(rows, functools.partial(assemble, k_seg, v_seg, local[:, -1]),
                                                  most=cap)
        group = steps.compiled(steps.segment_group, donate, cfg=cfg, R=R, prefix=prefix, g=g)
        h, dev = group(params, dev, h, pos, k_mem, v_mem, local[:, :-1], w)
        last.append((last_i, last_w))
        ret_k.append(k_last)
        ret_v.append(v_last)
    dev = memory.set_retrieval(dev, last, fetch=False)
    dev = dev.replace(ret_k=jnp.stack(ret_k).astype(dev.ret_k.dtype), ret_v=jnp.stack(ret_v).astype(dev.ret_v.dtype))
    logits = steps.compiled(steps.segment_logits, False, cfg=cfg, all_logits=all_logits)(params, h)
    return logits, dev
