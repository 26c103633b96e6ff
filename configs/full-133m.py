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

# --- run: bf16 compute over fp32 master weights, per-layer remat; the paper's optimizer settings.
# Set data.corpus and data.tokenizer (a GPT-2-style tokenizer.json) for a real pretraining run; the
# model's vocabulary and special ids are always taken from the tokenizer.
from drt_jax.data.config import DataConfig  # noqa: E402
from drt_jax.train.config import OptimConfig, RunConfig, TrainConfig  # noqa: E402

RUN = RunConfig(
    name=MODEL.name,
    model=MODEL.replace(dtype="bfloat16", param_dtype="float32", remat="full"),
    data=DataConfig(corpus="default", tokenizer="byte", seq_len=16384),
    optim=OptimConfig(peak_lr=2e-3, end_lr=4e-4, warmup_fraction=0.02, weight_decay=0.1, clip_norm=1.0),
    train=TrainConfig(steps=20000, batch=8, eval_every=1000, eval_steps=16, checkpoint_every=1000, keep_checkpoints=3),
)
