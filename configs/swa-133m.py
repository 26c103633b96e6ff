"""swa-133m: the BaseLM baseline: 12 Llama layers with a 512-slot sliding window, no retrieval.

Same width, MLP and vocabulary as drt-133m (123.6M parameters). For the "average attention field"
comparison of the paper, override window=768.
"""

from drt_jax.config import ModelConfig

MODEL = ModelConfig(
    name="swa-133m",
    arch="swa",
    vocab_size=50265,
    pad_id=50257,
    eos_id=50256,
    landmark_id=50264,
    d_model=768,
    n_heads=12,
    mlp_dim=2048,
    decoder_layers=(12,),
    encoder_layers=0,
    window=512,
)
