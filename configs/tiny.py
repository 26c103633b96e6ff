"""tiny: a DRT small enough for unit tests and the README's CPU job (byte-level vocabulary).

Two retrieval groups (multi-hop) and grouped-query attention, so every code path is exercised.
"""

from drt_jax.config import ModelConfig

MODEL = ModelConfig(
    name="tiny",
    arch="drt",
    vocab_size=259,  # ByteTokenizer: 256 bytes + pad 256, eos 257, landmark 258
    pad_id=256,
    eos_id=257,
    landmark_id=258,
    d_model=128,
    n_heads=4,
    n_kv_heads=2,
    mlp_dim=384,
    decoder_layers=(2, 1, 1),
    encoder_layers=1,
    chunk_size=15,
    window=48,
    top_k=4,
)
