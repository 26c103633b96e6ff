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

# --- run: bf16 compute over fp32 master weights, the least remat that fits the device; the paper's optimizer settings.
# Set data.corpus and data.tokenizer (a GPT-2-style tokenizer.json) for a real pretraining run; the
# model's vocabulary and special ids are always taken from the tokenizer.
from drt_jax.data.config import DataConfig  # noqa: E402
from drt_jax.train.config import OptimConfig, RunConfig, TrainConfig  # noqa: E402

RUN = RunConfig(
    name=MODEL.name,
    model=MODEL.replace(dtype="bfloat16", param_dtype="float32", remat="auto"),
    data=DataConfig(corpus="default", tokenizer="byte", seq_len=16384),
    optim=OptimConfig(peak_lr=2e-3, end_lr=4e-4, warmup_fraction=0.02, weight_decay=0.1, clip_norm=1.0),
    train=TrainConfig(steps=20000, batch=8, eval_every=1000, eval_steps=16, checkpoint_every=1000, keep_checkpoints=3),
)
