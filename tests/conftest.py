"""Shared fixtures: small model configs that run in seconds on CPU."""

import pytest

from drt_jax import ModelConfig


def small_config(**overrides) -> ModelConfig:
    """A DRT with 2 retrieval groups, GQA, 5-slot chunks and an 8-slot window."""
    base = dict(
        name="test", vocab_size=64, pad_id=61, eos_id=62, landmark_id=63,
        d_model=32, n_heads=4, n_kv_heads=2, mlp_dim=64, decoder_layers=(1, 1, 1), encoder_layers=1,
        chunk_size=4, window=8, top_k=2,
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def cfg() -> ModelConfig:
    return small_config()
