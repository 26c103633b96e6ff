"""Landmark slots: pad tokens to whole chunks, insert a landmark after every chunk, remove them again.

A sequence of T real tokens becomes C = ceil(T / S) chunks of S tokens (the last one right-padded with
the pad id) and L = C * (S + 1) slots; slot (c, p) with p < S holds token c*S + p and slot (c, S) holds
chunk c's landmark (spec 1.1). Right padding sits after every real token, so it never changes a
real token's logits.
"""

from __future__ import annotations

import jax.numpy as jnp


def num_chunks(num_tokens: int, chunk_size: int) -> int:
    return -(-num_tokens // chunk_size)


def insert_landmarks(tokens, chunk_size: int, landmark_id: int, pad_id: int):
    """tokens [B, T] -> slots [B, C * (S + 1)]."""
    B, T = tokens.shape
    C = num_chunks(T, chunk_size)
    padded = jnp.pad(tokens, ((0, 0), (0, C * chunk_size - T)), constant_values=pad_id)
    chunks = padded.reshape(B, C, chunk_size)
    landmarks = jnp.full((B, C, 1), landmark_id, dtype=tokens.dtype)
    return jnp.concatenate([chunks, landmarks], axis=2).reshape(B, C * (chunk_size + 1))


def remove_landmarks(x, chunk_size: int, num_tokens: int):
    """x [B, C * (S + 1), ...] -> [B, T, ...]: drops landmark slots and the padding of the last chunk."""
    B, L = x.shape[:2]
    C = L // (chunk_size + 1)
    chunks = x.reshape(B, C, chunk_size + 1, *x.shape[2:])[:, :, :chunk_size]
    return chunks.reshape(B, C * chunk_size, *x.shape[2:])[:, :num_tokens]


def landmark_states(x, chunk_size: int):
    """x [B, C * (S + 1), ...] -> the landmark slot of every chunk, [B, C, ...]."""
    B, L = x.shape[:2]
    return x.reshape(B, L // (chunk_size + 1), chunk_size + 1, *x.shape[2:])[:, :, chunk_size]


def token_to_slot(t, chunk_size: int):
    """Slot index of real token t (works on ints and arrays)."""
    return (t // chunk_size) * (chunk_size + 1) + t % chunk_size


def prompt_padding(consumed: int, num_tokens: int, chunk_size: int) -> int:
    """Pad tokens to put before a prompt of num_tokens tokens, fed after `consumed` tokens, so that its
    last token lands on the first slot of a chunk (offset 0, ModelConfig.prompt_align="chunk"). The
    chunk before then ends with the prompt's last but one token, and its landmark, having read the
    question, makes the retrieval that the answer's chunk reads: the layout NIAH is trained on."""
    return (-(consumed + num_tokens - 1)) % chunk_size
