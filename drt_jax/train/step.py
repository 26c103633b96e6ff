"""Train state, its shardings, and the jitted train / eval steps.

The state is a plain dict (easy to checkpoint): params (unboxed fp32 master weights), opt_state,
step (int32 scalar) and rng (uint32[2] base key; step s uses fold_in(rng, s), so a resumed run
draws the same noise as a straight one).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from drt_jax.config import ModelConfig
from drt_jax.losses import blocked_cross_entropy, next_token_targets
from drt_jax.model import DRT
from drt_jax.train import mesh as mesh_lib


def _init_tokens(cfg: ModelConfig):
    return jnp.zeros((1, cfg.slots_per_chunk * 2 if cfg.uses_retrieval else 16), jnp.int32)


def boxed_param_shapes(cfg: ModelConfig):
    """Abstract (ShapeDtypeStruct) params, still in their LogicallyPartitioned boxes."""
    model = DRT(cfg)
    return jax.eval_shape(lambda k: model.init({"params": k}, _init_tokens(cfg))["params"], jax.random.PRNGKey(0))


def _dict_suffix(path) -> tuple:
    keys = []
    for k in reversed(path):
        if isinstance(k, jax.tree_util.DictKey):
            keys.append(k.key)
        else:
            break
    return tuple(reversed(keys))


def opt_state_shardings(abstract_opt, param_shardings, param_shapes, mesh):
    """Optimizer-state leaves that mirror a parameter get its sharding; the rest are replicated."""
    by_path = {}
    for path, sh in jax.tree_util.tree_flatten_with_path(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]:
        by_path[_dict_suffix(path)] = sh
    shapes = {_dict_suffix(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(param_shapes)[0]}

    def pick(path, leaf):
        key = _dict_suffix(path)
        if key in by_path and shapes[key] == getattr(leaf, "shape", None):
            return by_path[key]
        return mesh_lib.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


@dataclasses.dataclass
class StateSpec:
    """Abstract state (ShapeDtypeStruct with shardings) plus the pieces the steps need."""

    abstract: dict  # ShapeDtypeStruct leaves carrying .sharding
    shardings: dict
    param_shardings: Any
    mesh: Any


def state_spec(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, rules) -> StateSpec:
    boxed = boxed_param_shapes(cfg)
    params_abs = nn.unbox(boxed)
    p_sh = mesh_lib.logical_shardings(boxed, mesh, rules)
    opt_abs = jax.eval_shape(tx.init, params_abs)
    o_sh = opt_state_shardings(opt_abs, p_sh, params_abs, mesh)
    rep = mesh_lib.replicated(mesh)
    shardings = {"params": p_sh, "opt_state": o_sh, "step": rep, "rng": rep}
    abstract = {
        "params": params_abs, "opt_state": opt_abs,
        "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return StateSpec(abstract=abstract, shardings=shardings, param_shardings=p_sh, mesh=mesh)


def init_state(cfg: ModelConfig, tx, spec: StateSpec, seed: int) -> dict:
    """Initialises params and optimizer state directly into their shardings (one jit)."""
    model = DRT(cfg)

    def init(key):
        pkey, rkey = jax.random.split(key)
        params = nn.unbox(model.init({"params": pkey}, _init_tokens(cfg))["params"])
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(rkey).astype(jnp.uint32) if jnp.issubdtype(rkey.dtype, jax.dtypes.prng_key) else rkey}

    return jax.jit(init, out_shardings=spec.shardings)(jax.random.PRNGKey(seed))


def _loss_sum(model: DRT, cfg: ModelConfig, params, tokens, data_mask, key, *, deterministic: bool, block_size: int):
    """Summed next-token cross-entropy and the number of scored tokens of one micro-batch."""
    gkey, dkey = jax.random.split(key)
    hidden = model.apply(
        {"params": params}, tokens, deterministic=deterministic, return_hidden=True,
        rngs=None if deterministic else {"gumbel": gkey, "dropout": dkey},
    )
    targets, mask = next_token_targets(tokens, cfg.pad_id)
    if data_mask is not None:
        # data_mask marks loss targets by token position; position t predicts token t + 1.
        shifted = jnp.concatenate([data_mask[:, 1:], jnp.zeros_like(data_mask[:, :1])], axis=1)
        mask = mask * shifted.astype(mask.dtype)
    mean, count = blocked_cross_entropy(hidden, params["embed"]["embedding"], targets, mask, block_size=block_size)
    return mean * count, count


def make_train_step(cfg: ModelConfig, tx, schedule, spec: StateSpec, batch_sharding, *, grad_accum: int, block_size: int):
    """Returns jit(step)(state, batch) -> (state, metrics) with explicit in/out shardings."""
    model = DRT(cfg)

    def step(state, batch):
        params = state["params"]
        key = jax.random.fold_in(state["rng"], state["step"])
        tokens = batch["tokens"]
        data_mask = batch.get("mask")
        B, T = tokens.shape
        micro = B // grad_accum

        def split(x):
            # Row b*grad_accum + a goes to micro-batch a, so every device keeps its rows.
            x = x.reshape(micro, grad_accum, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, NamedSharding(spec.mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec)))

        grad_fn = jax.value_and_grad(
            lambda p, t, m, k: _loss_sum(model, cfg, p, t, m, k, deterministic=False, block_size=block_size), has_aux=True,
        )
        if grad_accum == 1:
            (loss_sum, count), grads = grad_fn(params, tokens, data_mask, key)
        else:
            toks = split(tokens)
            masks = split(data_mask) if data_mask is not None else None

            def body(carry, i):
                g_acc, l_acc, c_acc = carry
                m = masks[i] if masks is not None else None
                (loss_i, c), g = grad_fn(params, toks[i], m, jax.random.fold_in(key, i))
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss_i, c_acc + c), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss_sum, count), _ = jax.lax.scan(
                body, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), jnp.arange(grad_accum)
            )
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss_sum / denom, "tokens": count, "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]), "param_norm": optax.tree.norm(new_params),
        }
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, metrics

    rep = mesh_lib.replicated(spec.mesh)
    batch_sh = {"tokens": batch_sharding, "mask": batch_sharding}
    return jax.jit(step, in_shardings=(spec.shardings, batch_sh), out_shardings=(spec.shardings, rep), donate_argnums=(0,))


def make_eval_step(cfg: ModelConfig, spec: StateSpec, batch_sharding, *, block_size: int):
    """jit(eval)(params, batch) -> (loss_sum, count), deterministic (no dropout, no Gumbel noise)."""
    model = DRT(cfg)

    def evaluate(params, batch):
        return _loss_sum(model, cfg, params, batch["tokens"], batch.get("mask"), jax.random.PRNGKey(0),
                         deterministic=True, block_size=block_size)

    rep = mesh_lib.replicated(spec.mesh)
    return jax.jit(evaluate, in_shardings=(spec.param_shardings, {"tokens": batch_sharding, "mask": batch_sharding}),
                   out_shardings=(rep, rep))
