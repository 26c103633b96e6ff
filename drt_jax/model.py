"""DRT: embed -> lower layers -> chunk encoder -> retrieval groups (retrieve, upper layers) -> logits.

The two baselines (arch "swa", "full") are the same code without landmarks, encoder and groups.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from drt_jax import chunking, retrieval
from drt_jax.config import ModelConfig
from drt_jax.layers import ChunkEncoder, LowerLayer, RMSNorm, UpperLayer, maybe_remat


def _embedding_init(cfg: ModelConfig):
    normal = nn.initializers.normal(cfg.init_std)

    def init(key, shape, dtype=jnp.float32):
        # The pad row starts at zero (padding-index semantics, spec 2.2).
        return normal(key, shape, dtype).at[cfg.pad_id].set(0.0)

    return nn.with_logical_partitioning(init, ("vocab", "embed"))


# Vocabularies up to this size (byte-level models) are looked up by a one-hot matmul rather than a
# gather. The gather's gradient is a scatter-add whose atomics pile up on the rows of frequent tokens:
# on byte-level text it took 72% of drt-20m's training step on an H100 (104 of 144 ms), while the
# matmul's gradient is one GEMM of 2 * tokens * vocab * d FLOPs, which is small at such vocabularies.
ONE_HOT_EMBED_MAX_VOCAB = 8192


def one_hot_embed(table, ids, dtype):
    """Rows of `table` [V, d] for `ids` int [...] as a one-hot matmul -> [..., d] in `dtype`.

    Exact: each output is one table entry times 1 plus zeros, accumulated in float32 (and at full
    float32 precision for a float32 dtype, where the GPU default would round the table to tf32)."""
    dtype = jnp.dtype(dtype)
    one_hot = jax.nn.one_hot(ids, table.shape[0], dtype=dtype)
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    out = jnp.einsum("...v,vd->...d", one_hot, table.astype(dtype), preferred_element_type=jnp.float32, precision=precision)
    return out.astype(dtype)


class DRT(nn.Module):
    """The Differentiable Retrieval-based Transformer.

    __call__(tokens [B, T] int32, deterministic=True, return_hidden=False) -> logits [B, T, V]
    (or, with return_hidden, the final-normed hidden states [B, T, d], for a blocked loss).
    Landmark slots are inserted and removed inside; T need not be a multiple of chunk_size.
    Negative token ids are read as padding. In training (deterministic=False) the rngs "gumbel"
    (retrieval noise, if cfg.gumbel_noise) and "dropout" (if cfg.dropout_rate > 0) are needed.

    Sown into "intermediates", per retrieval group g: `retrieval_indices_g{g}` and
    `retrieval_weights_g{g}` [B, C, K] (row c is the retrieval made by chunk c's landmark, consumed by
    chunk c + 1). The retrieval scores pass through `self.perturb("retrieval_scores_g{g}")`, so the
    gradient of a loss with respect to them is available through the "perturbations" collection.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, embedding_init=_embedding_init(cfg),
            dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        )
        self.final_norm = RMSNorm(cfg.norm_eps, cfg.dtype)

    def __call__(self, tokens, deterministic: bool = True, return_hidden: bool = False):
        h = self.hidden_states(tokens, deterministic=deterministic)
        return h if return_hidden else self.logits(h)

    def logits(self, h):
        """h [..., d] -> tied logits [..., V]."""
        return self.embed.attend(h)

    @nn.compact
    def hidden_states(self, tokens, deterministic: bool = True):
        cfg = self.config
        B, T = tokens.shape
        tokens = jnp.where(tokens < 0, cfg.pad_id, tokens).astype(jnp.int32)
        drt = cfg.uses_retrieval
        slots = chunking.insert_landmarks(tokens, cfg.chunk_size, cfg.landmark_id, cfg.pad_id) if drt else tokens
        positions = jnp.arange(slots.shape[1])
        if cfg.vocab_size <= ONE_HOT_EMBED_MAX_VOCAB:
            embedded = one_hot_embed(self.embed.embedding, slots, cfg.dtype)
        else:
            embedded = self.embed(slots)
        h = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(embedded)

        lower_cls = maybe_remat(LowerLayer, cfg)
        n_plain = cfg.n_lower if drt else cfg.n_layers
        for i in range(n_plain):
            h = lower_cls(cfg, deterministic, name=f"lower_{i}")(h, positions)

        if drt:
            landmark_keys, k_mem, v_mem = ChunkEncoder(cfg, deterministic, name="encoder")(h)
            upper_cls = maybe_remat(UpperLayer, cfg)
            for g, n_layers in enumerate(cfg.groups):
                # Retrieval runs in at least float32 whatever the compute dtype: top-k is sensitive.
                score_dtype = jnp.promote_types(cfg.dtype, jnp.float32)
                query = RMSNorm(cfg.norm_eps, score_dtype.name, name=f"landmark_norm_g{g}")(
                    chunking.landmark_states(h, cfg.chunk_size)
                )
                scores = retrieval.landmark_scores(query, landmark_keys.astype(score_dtype))
                scores = self.perturb(f"retrieval_scores_g{g}", scores)
                noise_rng = self.make_rng("gumbel") if (cfg.gumbel_noise and not deterministic) else None
                indices, weights = retrieval.causal_topk(scores, cfg.top_k, gumbel_rng=noise_rng,
                                                         gumbel_scale=cfg.gumbel_scale)
                self.sow("intermediates", f"retrieval_indices_g{g}", indices)
                self.sow("intermediates", f"retrieval_weights_g{g}", weights)
                indices, weights = retrieval.shift_to_consumers(indices, weights)
                for i in range(n_layers):
                    h = upper_cls(cfg, deterministic, name=f"group{g}_layer_{i}")(
                        h, positions, k_mem, v_mem, indices, weights
                    )

        h = self.final_norm(h)
        return chunking.remove_landmarks(h, cfg.chunk_size, T) if drt else h


def parameter_count(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from abstract shapes (nothing is allocated): total, embedding, non-embedding."""
    tokens = jnp.zeros((1, cfg.slots_per_chunk * 2), jnp.int32)
    shapes = jax.eval_shape(lambda: DRT(cfg).init(jax.random.PRNGKey(0), tokens))["params"]
    total = sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(shapes)))
    embedding = cfg.vocab_size * cfg.d_model
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
