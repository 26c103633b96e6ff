"""drt-133m: the paper's pretraining configuration (authors' config/DRT/config_63.json, spec section 0).

Parameter count: 146.0M with the GPT-2 vocabulary (50265 = 50257 BPE ids + 8 spare), of which
38.6M are the tied embeddings and 107.4M are non-embedding. The paper's "133M" label does not match
the released configuration; it would match a vocabulary of about 33K entries (the authors' optional
vocabulary compaction, which their model constructor never applies). `tests/test_presets.py`
prints and checks this count.

Differences from the released code, all switchable: RoPE instead of ALiBi in the decoder
(position="alibi" for parity), explicit off-by-one GCA softmax instead of a zeroed landmark row
(mathematically identical for S=63).
"""

from drt_jax.config import ModelConfig

MODEL = ModelConfig(
    name="drt-133m",
    arch="drt",
    vocab_size=50265,
    pad_id=50257,
    eos_id=50256,
    landmark_id=50264,
    d_model=768,
    n_heads=12,
    mlp_dim=2048,
    decoder_layers=(6, 6),
    encoder_layers=2,
    chunk_size=63,
    window=512,
    top_k=8,
)
