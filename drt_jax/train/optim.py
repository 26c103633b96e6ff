"""AdamW + warm-up/cosine schedule + global-norm clipping (paper: peak 2e-3, floor 4e-4, 2% warm-up)."""

from __future__ import annotations

import jax
import optax

from drt_jax.train.config import OptimConfig


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return int(round(cfg.warmup_fraction * total_steps))


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear 0 -> peak over the warm-up, then cosine peak -> end_lr at total_steps (constant after)."""
    warm = warmup_steps(cfg, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=warm,
        decay_steps=max(total_steps, warm + 1), end_value=cfg.end_lr,
    )


def decay_mask(params):
    """True where weight decay applies: every matrix except the embedding table; never norm gains."""

    def keep(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
        if leaf.ndim < 2:
            return False  # RMSNorm gains
        return not (names and names[0] == "embed")

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    mask = None if cfg.decay_norms_and_embeddings else decay_mask
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    )
    return optax.chain(*parts), schedule
