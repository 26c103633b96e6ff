"""drt-355m: the review discussion's ~355M DRT: 22 decoder layers = 10 lower + 2 groups of 6.

Heads and MLP width are not stated by the sources [ambiguous]: we use head_dim 64 and
mlp_dim = 8/3 * d rounded up to a multiple of 128, as in the 133M model.
"""

from drt_jax.config import ModelConfig

MODEL = ModelConfig(
    name="drt-355m",
    arch="drt",
    vocab_size=50265,
    pad_id=50257,
    eos_id=50256,
    landmark_id=50264,
    d_model=1024,
    n_heads=16,
    mlp_dim=2816,
    decoder_layers=(10, 6, 6),
    encoder_layers=2,
    chunk_size=63,
    window=512,
    top_k=8,
)
