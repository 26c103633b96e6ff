"""drt-20m: the small DRT of the results experiments (issue 9), trained on one H100 in short segments.

d_model 384, 6 heads, SwiGLU 1024, decoder (4, 4) = 4 lower layers + one retrieval group of 4 upper
layers, 2 encoder layers, chunks of 63 tokens, a 256-slot window, top-8 retrieval, byte tokens, bf16.
The run mixes NIAH-single fine-tuning examples (spec 7.4) into language modelling on the
python-all corpus (which does not repeat within the run), at 4,096 tokens per sequence, with the
answer tokens weighted up (see experiments/README.md for why).
"""

from drt_jax.config import ModelConfig
from drt_jax.data.config import DataConfig
from drt_jax.train.config import OptimConfig, RunConfig, TrainConfig

MODEL = ModelConfig(
    name="drt-20m",
    arch="drt",
    vocab_size=259,
    pad_id=256,
    eos_id=257,
    landmark_id=258,
    d_model=384,
    n_heads=6,
    mlp_dim=1024,
    decoder_layers=(4, 4),
    encoder_layers=2,
    chunk_size=63,
    window=256,
    top_k=8,
    dtype="bfloat16",
)

RUN = RunConfig(
    name="drt-20m",
    model=MODEL,
    # niah_align="chunk": the recipes and results of experiments/README.md and docs/results.md were made
    # with questions ending on the chunk grid (issue 25 made uniform offsets the default).
    data=DataConfig(corpus="python-all", tokenizer="byte", seq_len=4096, mixture=(("niah_single", 0.5),),
                    corpus_weight=0.5, niah_align="chunk"),
    optim=OptimConfig(peak_lr=1e-3, end_lr=1e-4, warmup_fraction=0.02, weight_decay=0.1),
    train=TrainConfig(steps=2500, batch=16, eval_every=0, eval_steps=8, checkpoint_every=500, keep_checkpoints=2,
                      log_every=50, answer_loss_weight=20.0),
)
