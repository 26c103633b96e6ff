"""Perplexity by context length with sliding windows (spec 7.1), scored in tokens.

A window of `length` tokens starts every `stride` tokens; the first window scores all its tokens, each
later one only its last `stride` tokens (counted in tokens, not slots: the authors count slots). With
stride <= 0 the windows do not overlap and every token is scored. Each window is independent (no memory
across windows). Reported: ppl = exp(token-weighted mean CE) and the authors' exp(mean of per-window CE).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.evaluate.common import EvalError


@functools.lru_cache(maxsize=8)
def _nll_fn(cfg):
    from drt_jax.model import DRT

    @jax.jit
    def nll(params, tokens):
        logits = DRT(cfg).apply({"params": params}, tokens[:, :-1]).astype(jnp.float32)
        lp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]

    return nll


def windows(n_tokens: int, length: int, stride: int, max_windows: int | None):
    """-> list of (start, first scored target index within the window)."""
    if n_tokens < length + 1:
        raise EvalError(f"the data has {n_tokens} tokens, fewer than one window of {length} (+1); give more text")
    step = length if stride <= 0 else stride
    out = []
    for start in range(0, n_tokens - length, step):
        first = 0 if (start == 0 or stride <= 0) else length - stride
        out.append((start, first))
        if max_windows and len(out) >= max_windows:
            break
    return out


def perplexity(cfg, params, tokens: np.ndarray, length: int, stride: int, *, max_windows: int | None = None,
               progress=None) -> dict:
    if length < 2:
        raise EvalError(f"length {length} is too short; give >= 2 tokens")
    if stride > length:
        raise EvalError(f"stride {stride} exceeds the window length {length}")
    nll = _nll_fn(cfg)
    total, count, per_window = 0.0, 0, []
    for start, first in windows(len(tokens), length, stride, max_windows):
        w = jnp.asarray(tokens[start : start + length + 1][None])
        losses = np.asarray(nll(params, w))[0, first:]
        total += float(losses.sum())
        count += losses.size
        per_window.append(float(losses.mean()))
        if progress is not None:
            progress(1)
    return {
        "length": length, "stride": stride, "windows": len(per_window), "tokens_scored": count,
        "ce": total / count, "ppl": float(np.exp(total / count)),
        "ppl_window_mean": float(np.exp(np.mean(per_window))),
    }
