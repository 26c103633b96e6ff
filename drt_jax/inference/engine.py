"""Incremental inference for DRT (and the swa / full baselines): prefill in segments, decode steps.

The model's math runs in its own modules (drt_jax.model: `DRT.decode` and the prefill stages); this
engine keeps the state (memory.py), the chunk memory on the device or on the host (offload.py), and the
schedule: which compiled step (steps.py) runs on which slice of the input.

At a chunk boundary the decode step gets the token and its chunk's landmark slot: the model encodes the
finished chunk, runs every group's layers with the *old* retrieval and computes each group's *new*
retrieval from the landmark slot of the hidden state entering the group; the engine stores the chunk
and gathers (or, offloaded, fetches) the newly retrieved chunks for the next chunk's slots.

Prefill runs whole chunks in segments of `segment_chunks` chunks (bounded device memory): each segment
attends to the previous W slots through the ring, retrieves over all earlier chunks (global chunk ids),
and its first chunk reads the previous segment's last retrieval (the authors' code gives it none).
Whole segments are followed by segments of a power of two of chunks (bounded compilations for prompts
of any length), then a partial last chunk of the prompt is fed through decode steps. The swa baseline
prefills in segments of the same number of tokens (segment_chunks * chunk_size), then in powers of two
of tokens, not decode steps. A DRT prompt is first aligned so that it ends on a chunk's first slot
(ModelConfig.prompt_align), so a question is read by the landmark whose retrieval answers it.

Shapes are fixed per (batch, capacity), so decoding does not recompile as the context grows; the memory
capacity grows in blocks of `memory_block` chunks (one recompile per block) unless `max_chunks` is set
large enough up front.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drt_jax import chunking
from drt_jax.config import ModelConfig
from drt_jax.inference import memory, offload, steps
from drt_jax.inference.memory import DeviceState, InferenceState
from drt_jax.inference.offload import HostMemory

__all__ = ["DeviceState", "HostMemory", "InferenceEngine", "InferenceError", "InferenceState"]


class InferenceError(ValueError):
    """A request the inference engine cannot serve (bad prompt, capacity exceeded, ...)."""


def segment_length(remaining: int, unit: int, seg_tokens: int) -> int:
    """Tokens of the next prefill segment: a whole segment while one fits, then the largest power of two
    of units (chunks, or tokens for swa) left. A prompt of any length then compiles at most
    log2(segment_chunks) + 2 segment shapes, where one shape per tail length recompiled for every prompt
    of a sweep at random lengths."""
    if remaining >= seg_tokens:
        return seg_tokens
    return (1 << ((remaining // unit).bit_length() - 1)) * unit


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
            # The window of both slots of a step that closes a chunk (its token and its landmark).
            self.R = cfg.window + 2
        self.segment_chunks = segment_chunks
        self.donate = donate
        self._decode = {
            closes: steps.compiled(steps.decode_step, donate, cfg=cfg, R=self.R, closes_chunk=closes, offload=self.offload)
            for closes in (False, True)
        }

    # ---- state -----------------------------------------------------------------------------------
    def init_state(self, max_chunks: int | None = None) -> InferenceState:
        cfg = self.cfg
        E = self._round_capacity(max_chunks or self.initial_chunks) if cfg.uses_retrieval else 0
        self._check_fits(E)
        dev = memory.empty(cfg, self.B, E, offload=self.offload)
        dev = dev.replace(cache=steps.empty_cache(cfg, self.params, dev, self.B, self.R))
        host = None
        if self.offload:
            host = HostMemory.zeros((self.B, E, cfg.chunk_size, cfg.kv_heads, cfg.head_dim), cfg.dtype)
        return InferenceState(dev, host=host)

    def _check_fits(self, capacity: int) -> None:
        """A one-line error, before any allocation, when the chunk memory at `capacity` rows cannot fit
        the device (XLA's out-of-memory error would come from deep inside the first step)."""
        need = memory.device_bytes(self.cfg, self.B, capacity, offload=self.offload)
        free = memory.device_free_bytes()
        if free is None or need <= free:
            return
        gib = 2**30
        fix = "a smaller batch, a larger device or XLA_PYTHON_CLIENT_MEM_FRACTION up to 0.95"
        if not self.offload:
            fix = "offload='host' (eval.py --offload host), " + fix
        raise InferenceError(f"the chunk memory for {capacity:,} chunks x batch {self.B} needs {need / gib:.1f} GiB on "
                             f"the device, which has {free / gib:.1f} GiB free: use {fix}")

    def _round_capacity(self, n: int) -> int:
        return max(1, math.ceil(n / self.memory_block)) * self.memory_block

    def capacity(self, state: InferenceState) -> int:
        return state.dev.mem_lmk.shape[1] if self.cfg.uses_retrieval else 0

    def ensure_capacity(self, state: InferenceState, n_chunks: int) -> InferenceState:
        """Grows the chunk memory (in blocks) so it can hold n_chunks chunks."""
        if not self.cfg.uses_retrieval or n_chunks <= self.capacity(state):
            return state
        E = self._round_capacity(n_chunks)
        self._check_fits(E)
        host = state.host.grown(E) if state.host is not None else None
        return dataclasses.replace(state, dev=memory.grow(state.dev, E), host=host)

    # ---- decoding --------------------------------------------------------------------------------
    def step(self, state: InferenceState, tokens) -> tuple[jax.Array, InferenceState]:
        """Feeds one token per sequence ([B] ints); returns next-token logits [B, V] (float32)."""
        cfg = self.cfg
        tokens = jnp.asarray(tokens, jnp.int32).reshape(self.B)
        if cfg.arch == "full" and state.pos + 1 > self.R:
            raise InferenceError(f"context of {state.pos + 1} tokens exceeds max_len={self.R}")
        closes = cfg.uses_retrieval and (state.ntok + 1) % cfg.chunk_size == 0
        if closes:
            state = self.ensure_capacity(state, state.n_chunks + 1)
        # numpy scalars travel with the call; jnp.int32(...) would dispatch two conversions per token.
        logits, dev, host_kv = self._decode[closes](self.params, state.dev, tokens, np.int32(state.pos),
                                                    np.int32(state.n_chunks))
        if closes and self.offload:
            state.host.write(state.n_chunks, *host_kv)
            dev = offload.fetch_retrieved(dev, state.host)
        new = InferenceState(dev, pos=state.pos + 1 + int(closes), ntok=state.ntok + 1,
                             n_chunks=state.n_chunks + int(closes), host=state.host)
        return logits, new

    # ---- prefill ---------------------------------------------------------------------------------
    def prefill(self, state: InferenceState, tokens, *, align: bool | None = None, all_logits: bool = False,
                progress=None):
        """Feeds a prompt [B, T] (any T >= 1). Returns (logits, state): logits [B, V] of the prompt's last
        token, or with all_logits [B, T, V] for every prompt token (testing; memory grows with T).

        align (default: cfg.prompt_align == "chunk"; DRT only) left-pads the prompt with cfg.pad_id so that
        its last token opens a chunk (chunking.prompt_padding): the chunk before it, which holds the rest
        of the question, makes the retrieval that the answer reads. A later prompt on the same state (the
        next turn of a conversation) is aligned the same way. The pads become part of the context, as
        they are in the NIAH fine-tuning data (data.niah_align="pad"). align=False feeds the tokens as
        given (what the full forward of the same tokens computes).
        """
        cfg = self.cfg
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.shape[0] != self.B or tokens.shape[1] < 1:
            raise InferenceError(f"prompt shape {tokens.shape} does not match batch {self.B} x T>=1")
        pad = 0
        if cfg.uses_retrieval and (cfg.prompt_align == "chunk" if align is None else align):
            pad = chunking.prompt_padding(state.ntok, tokens.shape[1], cfg.chunk_size)
            tokens = np.concatenate([np.full((self.B, pad), cfg.pad_id, np.int32), tokens], axis=1)
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
            n = segment_length(T - t, unit, seg_tokens)
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
            return jnp.concatenate(outs, axis=1)[:, pad:], state
        return outs[-1][:, -1], state

    def _segment(self, state: InferenceState, tokens: np.ndarray, all_logits: bool):
        cfg = self.cfg
        n = tokens.shape[1]
        C = chunking.num_chunks(n, cfg.chunk_size) if cfg.uses_retrieval else 0
        L = C * cfg.slots_per_chunk if cfg.uses_retrieval else n
        prefix = min(state.pos, cfg.window) if cfg.window is not None else 0
        static = dict(cfg=cfg, R=self.R, prefix=prefix, all_logits=all_logits)
        if self.offload:
            logits, dev = offload.prefill_segment(self.params, state.dev, state.host, jnp.asarray(tokens), state.pos,
                                                  state.n_chunks, donate=self.donate, **static)
        else:
            segment = steps.compiled(steps.segment_device, self.donate, **static)
            logits, dev = segment(self.params, state.dev, tokens, np.int32(state.pos), np.int32(state.n_chunks))
        return logits, InferenceState(dev, pos=state.pos + L, ntok=state.ntok + n, n_chunks=state.n_chunks + C,
                                      host=state.host)
