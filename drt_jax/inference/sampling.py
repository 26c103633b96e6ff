"""Token sampling (greedy, temperature, top-p) and a batched generation loop over InferenceEngine."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("temperature", "top_p"))
def sample_logits(logits, rng, *, temperature: float = 0.0, top_p: float = 1.0):
    """logits [B, V] -> token ids [B] int32. temperature 0 is greedy; top_p < 1 keeps the smallest set
    of most likely tokens whose probability mass reaches top_p (nucleus sampling)."""
    logits = logits.astype(jnp.float32)
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = mass_before < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts, pad_id: int) -> np.ndarray:
    """A list of token lists -> [B, T] int32, shorter prompts left-padded with pad_id (as the
    authors' generator does); a [B, T] array passes through."""
    if isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
        arr = np.asarray(prompts, np.int32)
        return arr[None] if arr.ndim == 1 else arr
    prompts = [list(p) for p in prompts]
    T = max(len(p) for p in prompts)
    out = np.full((len(prompts), T), pad_id, np.int32)
    for i, p in enumerate(prompts):
        out[i, T - len(p):] = p
    return out


def generate(engine, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, eos_id: int | None = None, state=None, progress=None):
    """Prefills `prompts` and samples up to max_new_tokens per sequence.

    Returns (tokens [B, n] int32 numpy, state). Generation stops early when every sequence has produced
    eos_id; tokens after a sequence's eos are eos_id.
    """
    from drt_jax.inference.engine import InferenceError

    tokens = left_pad(prompts, engine.cfg.pad_id)
    if tokens.shape[1] == 0:
        raise InferenceError("empty prompt: give at least one token")
    state = engine.init_state() if state is None else state
    logits, state = engine.prefill(state, tokens)
    rng = jax.random.PRNGKey(seed)
    out = []
    done = np.zeros(tokens.shape[0], bool)
    for i in range(max_new_tokens):
        rng, sub = jax.random.split(rng)
        nxt = np.asarray(sample_logits(logits, sub, temperature=float(temperature), top_p=float(top_p)))
        if eos_id is not None:
            nxt = np.where(done, eos_id, nxt)
            done |= nxt == eos_id
        out.append(nxt)
        if progress is not None:
            progress(1)
        if (eos_id is not None and done.all()) or i == max_new_tokens - 1:
            break
        logits, state = engine.step(state, nxt)
    return np.stack(out, axis=1) if out else np.zeros((tokens.shape[0], 0), np.int32), state
