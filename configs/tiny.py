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

# --- run: the README's CPU job (`python train.py --config tiny`: a few hundred steps, < 10 min on 2 cores)
from drt_jax.data.config import DataConfig  # noqa: E402
from drt_jax.train.config import OptimConfig, RunConfig, TrainConfig  # noqa: E402

RUN = RunConfig(
    name="tiny",
    model=MODEL,  # float32 compute on CPU (bf16 matmuls are slow there)
    data=DataConfig(corpus="default", tokenizer="byte", seq_len=512),
    optim=OptimConfig(peak_lr=2e-3, end_lr=4e-4, warmup_fraction=0.02, weight_decay=0.1),
    train=TrainConfig(steps=250, batch=8, eval_every=125, eval_steps=4, checkpoint_every=125, keep_checkpoints=2, log_every=10),
)
