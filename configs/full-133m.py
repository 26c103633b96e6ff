"""full-133m: the full-causal-attention baseline (12 layers, no window, no retrieval)."""

from drt_jax.config import ModelConfig

MODEL = ModelConfig(
    name="full-133m",
    arch="full",
    vocab_size=50265,
    pad_id=50257,
    eos_id=50256,
    landmark_id=50264,
    d_model=768,
    n_heads=12,
    mlp_dim=2048,
    decoder_layers=(12,),
    encoder_layers=0,
    window=None,
)
