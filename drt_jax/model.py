"""DRT: embed -> lower layers -> chunk encoder -> retrieval groups (retrieve, upper layers) -> logits.

The two baselines (arch "swa", "full") are the same code without landmarks, encoder and groups.

The stages are methods over the same submodules, composed once for training (`hidden_states`) and
once per decode step (`decode`); a prefill segment calls them one by one (`prefill_lower`, `retrieve`,
`prefill_group`, `readout`) so that the caller can store the new chunks in its chunk memory, or fetch
retrieved chunks from the host, in between. Incremental calls keep each decoder layer's ring of past
keys/values and the open chunk's lower states in the "cache" collection (apply with mutable=["cache"]).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from drt_jax import chunking, retrieval
from drt_jax.config import ModelConfig
from drt_jax.layers import (
    ChunkEncoder,
    Incremental,
    LowerLayer,
    RMSNorm,
    UpperLayer,
    maybe_remat,
    normed,
    resolve,
)
from pallas_kernels.per_shard import KernelMesh


def _embedding_init(cfg: ModelConfig):
    normal = nn.initializers.normal(cfg.init_std)

    def init(key, shape, dtype=jnp.float32):
        # The pad row starts at zero (padding-index semantics, spec 2.2).
        return normal(key, shape, dtype).at[cfg.pad_id].set(0.0)

    return nn.with_logical_partitioning(init, ("vocab", "embed"))


# The stage modules below create their layers when called, with the call's `deterministic`, and share
# the DRT's scope (nn.share_scope): the parameters keep their top-level names (lower_0, encoder,
# landmark_norm_g0, group0_layer_0, ...) and dropout / Gumbel draws their paths.


class _Lower(nn.Module):
    """Embedding dropout and the lower layers (every layer of a baseline): [B, L, d] -> [B, L, d] as a
    layers.Stream (the last add pending)."""

    cfg: ModelConfig
    kernel_mesh: KernelMesh | None = None

    @nn.compact
    def __call__(self, h, positions, deterministic: bool = True, cache: Incremental | None = None):
        cfg = self.cfg
        h = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(h)
        # Without gradients there is nothing to rematerialise.
        layer_cls = maybe_remat(LowerLayer, cfg) if cache is None else LowerLayer
        extra = () if cache is None else (cache,)
        for i in range(cfg.n_lower if cfg.uses_retrieval else cfg.n_layers):
            h = layer_cls(cfg, deterministic, kernel_mesh=self.kernel_mesh, name=f"lower_{i}")(h, positions, *extra)
        return h


class _Encoder(nn.Module):
    """The chunk encoder: lower states of whole chunks [B, C*(S+1), d] -> (landmark keys, k_mem, v_mem)."""

    cfg: ModelConfig
    kernel_mesh: KernelMesh | None = None

    @nn.compact
    def __call__(self, u, deterministic: bool = True):
        return ChunkEncoder(self.cfg, deterministic, self.kernel_mesh, name="encoder")(u)


class _Retrieval(nn.Module):
    """Group g's retrieval: landmark states [B, C, d] entering the group, memory landmark keys [B, M, d]
    -> (indices, weights) [B, C, K]. Query chunk c has global id c + query_offset (retrieval.causal_topk)."""

    cfg: ModelConfig
    g: int

    @nn.compact
    def __call__(self, landmarks, memory_keys, query_offset=0, deterministic: bool = True):
        cfg, g = self.cfg, self.g
        # Retrieval runs in at least float32 whatever the compute dtype: top-k is sensitive.
        score_dtype = jnp.promote_types(cfg.dtype, jnp.float32)
        # [B, C, d] is one row a chunk: too small for a kernel to pay.
        query = RMSNorm(cfg.norm_eps, score_dtype.name, "reference", name=f"landmark_norm_g{g}")(landmarks)
        scores = retrieval.landmark_scores(query, memory_keys.astype(score_dtype))
        scores = self.perturb(f"retrieval_scores_g{g}", scores)
        noise_rng = self.make_rng("gumbel") if (cfg.gumbel_noise and not deterministic) else None
        indices, weights = retrieval.causal_topk(scores, cfg.top_k, gumbel_rng=noise_rng, gumbel_scale=cfg.gumbel_scale,
                                                 query_offset=query_offset)
        self.sow("intermediates", f"retrieval_indices_g{g}", indices)
        self.sow("intermediates", f"retrieval_weights_g{g}", weights)
        return indices, weights


class _Group(nn.Module):
    """Group g's upper layers: h [B, L, d] with GCA over k_mem/v_mem [B, M, S, Hkv, Dh] read through
    indices/weights [B, C, K] (row c serves the c-th run of L / C slots) -> [B, L, d] as a layers.Stream."""

    cfg: ModelConfig
    g: int
    kernel_mesh: KernelMesh | None = None

    @nn.compact
    def __call__(self, h, positions, k_mem, v_mem, indices, weights, deterministic: bool = True,
                 cache: Incremental | None = None):
        cfg = self.cfg
        layer_cls = maybe_remat(UpperLayer, cfg) if cache is None else UpperLayer
        extra = () if cache is None else (cache,)
        for i in range(cfg.groups[self.g]):
            layer = layer_cls(cfg, deterministic, kernel_mesh=self.kernel_mesh, name=f"group{self.g}_layer_{i}")
            h = layer(h, positions, k_mem, v_mem, indices, weights, *extra)
        return h


class _OpenChunk(nn.Module):
    """The lower states of the chunk being decoded, kept ("cache": states [B, S+1, d]) until its landmark
    slot arrives and the encoder can read the whole chunk. Writes h [B, n, d] at `offset` in the chunk."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h, offset):
        shape = (h.shape[0], self.cfg.slots_per_chunk, h.shape[-1])
        states = self.variable("cache", "states", jnp.zeros, shape, h.dtype)
        states.value = jax.lax.dynamic_update_slice_in_dim(states.value, h.astype(states.value.dtype), offset, axis=1)
        return states.value


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
    kernel_mesh: the mesh attention and GCA kernels run per shard over (None: called directly).

    Sown into "intermediates", per retrieval group g: `retrieval_indices_g{g}` and
    `retrieval_weights_g{g}` [B, C, K] (row c is the retrieval made by chunk c's landmark, consumed by
    chunk c + 1). The retrieval scores pass through `self.perturb("retrieval_scores_g{g}")`, so the
    gradient of a loss with respect to them is available through the "perturbations" collection.
    """

    config: ModelConfig
    kernel_mesh: KernelMesh | None = None

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, embedding_init=_embedding_init(cfg),
            dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        )
        self.final_norm = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.norm_impl, self.kernel_mesh)
        self.lower_stage = _Lower(cfg, self.kernel_mesh)
        nn.share_scope(self, self.lower_stage)
        if cfg.uses_retrieval:
            self.encoder_stage = _Encoder(cfg, self.kernel_mesh)
            self.retrieval_stages = [_Retrieval(cfg, g) for g in range(len(cfg.groups))]
            self.group_stages = [_Group(cfg, g, self.kernel_mesh) for g in range(len(cfg.groups))]
            for stage in (self.encoder_stage, *self.retrieval_stages, *self.group_stages):
                nn.share_scope(self, stage)
            self.open_chunk = _OpenChunk(cfg)

    def __call__(self, tokens, deterministic: bool = True, return_hidden: bool = False):
        h = self.hidden_states(tokens, deterministic=deterministic)
        return h if return_hidden else self.logits(h)

    def embed_slots(self, slots):
        """slots int [B, L] -> [B, L, d] in the compute dtype (a one-hot matmul for small vocabularies)."""
        cfg = self.config
        if cfg.vocab_size <= ONE_HOT_EMBED_MAX_VOCAB:
            return one_hot_embed(self.embed.embedding, slots, cfg.dtype)
        return self.embed(slots)

    def embed_tokens(self, tokens):
        """tokens [B, T] (negative = padding) -> slot inputs [B, L, d], landmarks inserted for DRT.

        Equal to embed_slots(_slots(tokens)). For a gathered table the landmark rows are broadcast from
        one lookup rather than gathered at every landmark slot: the gather's gradient is a scatter-add,
        and C landmark slots adding into one row serialise on its atomics (0.8 ms of drt-133m's
        step at 16K), while the broadcast's gradient is a sum."""
        cfg = self.config
        if not cfg.uses_retrieval or cfg.vocab_size <= ONE_HOT_EMBED_MAX_VOCAB:
            return self.embed_slots(self._slots(tokens))
        tokens = jnp.where(tokens < 0, cfg.pad_id, tokens).astype(jnp.int32)
        B, T = tokens.shape
        C, S = chunking.num_chunks(T, cfg.chunk_size), cfg.chunk_size
        padded = jnp.pad(tokens, ((0, 0), (0, C * S - T)), constant_values=cfg.pad_id)
        chunks = self.embed(padded).reshape(B, C, S, -1)
        landmark = self.embed(jnp.full((1, 1, 1), cfg.landmark_id, jnp.int32))
        landmarks = jnp.broadcast_to(landmark, (B, C, 1, chunks.shape[-1]))
        return jnp.concatenate([chunks, landmarks], axis=2).reshape(B, C * (S + 1), -1)

    def logits(self, h):
        """h [..., d] -> tied logits [..., V]."""
        return self.embed.attend(h)

    def readout(self, h):
        """Hidden states [..., d] -> logits [..., V]: final norm, then the tied head."""
        return self.logits(self.final_norm(h))

    def _slots(self, tokens):
        """tokens [B, T] (negative = padding) -> slots [B, L], landmarks inserted for DRT."""
        cfg = self.config
        tokens = jnp.where(tokens < 0, cfg.pad_id, tokens).astype(jnp.int32)
        if not cfg.uses_retrieval:
            return tokens
        return chunking.insert_landmarks(tokens, cfg.chunk_size, cfg.landmark_id, cfg.pad_id)

    def hidden_states(self, tokens, deterministic: bool = True):
        cfg = self.config
        T = tokens.shape[1]
        x = self.embed_tokens(tokens)
        positions = jnp.arange(x.shape[1])
        h = self.lower_stage(x, positions, deterministic)
        if cfg.uses_retrieval:
            h = resolve(h)
            landmark_keys, k_mem, v_mem = self.encoder_stage(h, deterministic)
            for retrieve, group in zip(self.retrieval_stages, self.group_stages, strict=True):
                h = resolve(h)
                landmarks = chunking.landmark_states(h, cfg.chunk_size)
                indices, weights = retrieve(landmarks, landmark_keys, deterministic=deterministic)
                indices, weights = retrieval.shift_to_consumers(indices, weights)
                h = group(h, positions, k_mem, v_mem, indices, weights, deterministic)
        # The last layer's residual add runs inside the final norm's kernel.
        _, h = normed(self.final_norm, h)
        return chunking.remove_landmarks(h, cfg.chunk_size, T) if cfg.uses_retrieval else h

    # ---- incremental inference (apply with mutable=["cache"]) ------------------------------------

    def decode(self, tokens, position, *, ring: int, closes_chunk: bool, gca=(), memory_keys=None, chunks_done=None):
        """One decode step: tokens [B] at absolute slot `position` (traced).

        closes_chunk (static): the token is its chunk's last; the chunk's landmark slot follows it in
          this step, the finished chunk is encoded and every group retrieves for the next chunk.
        gca: per retrieval group, the GCA inputs of the current chunk (made by the last landmark):
          (k_mem, v_mem [B, M, S, Hkv, Dh], indices, weights [B, 1, K]).
        memory_keys [B, E, d], chunks_done: the chunk memory's landmark keys and how many chunks it
          holds (rows from chunks_done on are not read); needed only when closes_chunk.
        Returns (logits [B, V] of the token, the finished chunk as (landmark key [B, 1, d],
        k_mem, v_mem [B, 1, S, Hkv, Dh]) and the new retrieval, one (indices, weights) [B, K] per group;
        the last two are None unless closes_chunk).
        """
        cfg = self.config
        slots = jnp.where(tokens < 0, cfg.pad_id, tokens).astype(jnp.int32)[:, None]
        if closes_chunk:
            slots = jnp.concatenate([slots, jnp.full_like(slots, cfg.landmark_id)], axis=1)
        positions = position + jnp.arange(slots.shape[1])
        cache = Incremental(ring)
        h = resolve(self.lower_stage(self.embed_slots(slots), positions, cache=cache))
        if not cfg.uses_retrieval:
            return self.readout(h[:, 0]), None, None
        chunk = self.open_chunk(h, jnp.mod(position, cfg.slots_per_chunk))
        finished = self.encoder_stage(chunk) if closes_chunk else None
        new = []
        for g, (retrieve, group) in enumerate(zip(self.retrieval_stages, self.group_stages, strict=True)):
            if closes_chunk:
                indices, weights = retrieve(h[:, -1:], memory_keys, query_offset=chunks_done)
                new.append((indices[:, 0], weights[:, 0]))
            h = resolve(group(h, positions, *gca[g], cache=cache))
        return self.readout(h[:, 0]), finished, (new if closes_chunk else None)

    def prefill_lower(self, tokens, position, *, ring: int, prefix: int):
        """A prefill segment's embedding and lower layers: tokens [B, T] (whole chunks for DRT) from absolute
        slot `position` -> (h [B, L, d], the segment's chunks encoded as (landmark keys [B, C, d],
        k_mem, v_mem [B, C, S, Hkv, Dh]), or None for a baseline). prefix: see Incremental."""
        x = self.embed_tokens(tokens)
        positions = position + jnp.arange(x.shape[1])
        h = resolve(self.lower_stage(x, positions, cache=Incremental(ring, prefix)))
        return h, (self.encoder_stage(h) if self.config.uses_retrieval else None)

    def retrieve(self, g: int, h, memory_keys, chunks_done):
        """Group g's retrieval made by each chunk of a segment h [B, C*(S+1), d] (the state entering group g)
        over memory_keys [B, E, d]; the segment's chunk c has global id chunks_done + c -> (indices,
        weights) [B, C, K]; row c serves chunk c + 1."""
        landmarks = chunking.landmark_states(h, self.config.chunk_size)
        return self.retrieval_stages[g](landmarks, memory_keys, query_offset=chunks_done)

    def prefill_group(self, g: int, h, position, k_mem, v_mem, indices, weights, *, ring: int, prefix: int):
        """Group g's upper layers over a prefill segment h [B, L, d] from absolute slot `position`, GCA
        reading k_mem/v_mem [B, M, S, Hkv, Dh] through indices/weights [B, C, K] -> [B, L, d]."""
        positions = position + jnp.arange(h.shape[1])
        return resolve(self.group_stages[g](h, positions, k_mem, v_mem, indices, weights, cache=Incremental(ring, prefix)))


def parameter_count(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from abstract shapes (nothing is allocated): total, embedding, non-embedding."""
    tokens = jnp.zeros((1, cfg.slots_per_chunk * 2), jnp.int32)
    shapes = jax.eval_shape(lambda: DRT(cfg).init(jax.random.PRNGKey(0), tokens))["params"]
    total = sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(shapes)))
    embedding = cfg.vocab_size * cfg.d_model
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
