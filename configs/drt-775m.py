"""drt-775m: the review discussion's ~775M DRT: 34 decoder layers = 16 lower + 3 groups of 6.

Heads and MLP width are not stated by the sources [ambiguous]: head_dim 64, mlp_dim = 8/3 * d
rounded up to a multiple of 128.
"""

from drt_jax.config import ModelConfig

MODEL = ModelConfig(
    name="drt-775m",
    arch="drt",
    vocab_size=50265,
    pad_id=50257,
    eos_id=50256,
    landmark_id=50264,
    d_model=1280,
    n_heads=20,
    mlp_dim=3456,
    decoder_layers=(16, 6, 6, 6),
    encoder_layers=2,
    chunk_size=63,
    window=512,
    top_k=8,
)
