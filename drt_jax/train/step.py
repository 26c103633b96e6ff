"""Train state, its shardings, and the jitted train / eval steps.

The state is a plain dict (easy to checkpoint): params (unboxed fp32 master weights), opt_state,
step (int32 scalar) and rng (uint32[2] base key; step s uses fold_in(rng, s), so a resumed run
draws the same noise as a straight one).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from drt_jax.config import ConfigError, ModelConfig
from drt_jax.diagnostics import needle_stats
from drt_jax.inference.memory import device_free_bytes
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
    kernels: Any  # pallas_kernels.per_shard.KernelMesh: the axes attention kernels run per shard over


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
    return StateSpec(abstract=abstract, shardings=shardings, param_shardings=p_sh, mesh=mesh,
                     kernels=mesh_lib.kernel_mesh(mesh, rules))


def init_state(cfg: ModelConfig, tx, spec: StateSpec, seed: int) -> dict:
    """Initialises params and optimizer state directly into their shardings (one jit)."""
    model = DRT(cfg)

    def init(key):
        pkey, rkey = jax.random.split(key)
        params = nn.unbox(model.init({"params": pkey}, _init_tokens(cfg))["params"])
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(rkey).astype(jnp.uint32) if jnp.issubdtype(rkey.dtype, jax.dtypes.prng_key) else rkey}

    return jax.jit(init, out_shardings=spec.shardings)(jax.random.PRNGKey(seed))


def _shift_to_predictors(x, dtype):
    """x [B, T] marks tokens; -> [B, T] marking the positions that predict them (position t predicts t + 1)."""
    return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1).astype(dtype)


def _loss_sum(model: DRT, cfg: ModelConfig, params, batch, key, *, deterministic: bool, block_size: int,
              answer_weight: float = 1.0, logits_dtype: str = "float32", tasks: tuple[str, ...] = ()):
    """Summed next-token cross-entropy of one micro-batch -> (loss sum, (weight sum, diagnostics)).

    batch: {"tokens", "mask"[, "answer", "needle", "task"]} int32 [B, T]. With "answer", answer tokens
    weigh `answer_weight` in the loss and the diagnostics hold sums (over the batch) of the loss on corpus
    rows and on answer tokens and of each group's needle-chunk recall (drt_jax.diagnostics), so that
    micro-batches and steps can be added up before dividing. tasks: the mixture's task names; with two
    or more and a "task" field (each row's 1-based task number), the answer and recall sums are also
    kept per task, under "<name>/<sum>" (diagnostic_means names their means "<mean>/<name>").
    """
    tokens, data_mask = batch["tokens"], batch.get("mask")
    gkey, dkey = jax.random.split(key)
    hidden, state = model.apply(
        {"params": params}, tokens, deterministic=deterministic, return_hidden=True, mutable=["intermediates"],
        rngs=None if deterministic else {"gumbel": gkey, "dropout": dkey},
    )
    targets, mask = next_token_targets(tokens, cfg.pad_id)
    if data_mask is not None:
        mask = mask * _shift_to_predictors(data_mask, mask.dtype)
    embedding = params["embed"]["embedding"]
    if "answer" not in batch:
        mean, count = blocked_cross_entropy(hidden, embedding, targets, mask, block_size=block_size,
                                            logits_dtype=logits_dtype, lse_impl=cfg.lse_impl, kernel_mesh=model.kernel_mesh)
        return mean * count, (count, {})
    answer = batch["answer"]
    answer_t = mask * _shift_to_predictors(answer, mask.dtype)
    corpus_t = mask * (~jnp.any(answer > 0, axis=1))[:, None].astype(mask.dtype)
    weights = mask + (answer_weight - 1.0) * answer_t
    # Rows of each task ([n, B] float32), "" for the whole batch; per task only where there are several.
    row_task = jnp.max(batch["task"], axis=1) if "task" in batch and len(tasks) > 1 else None
    parts = {"": jnp.ones(answer.shape[:1], jnp.float32)}
    if row_task is not None:
        ids = {name: [i + 1 for i, n in enumerate(tasks) if n == name] for name in tasks}  # a task listed twice is one
        parts.update({f"{name}/": jnp.isin(row_task, jnp.asarray(i)).astype(jnp.float32) for name, i in ids.items()})
    rows = jnp.stack(list(parts.values()))
    answer_masks = answer_t[None] * rows[:, :, None]
    mean, count, sums = blocked_cross_entropy(hidden, embedding, targets, weights, block_size=block_size,
                                              metric_masks=jnp.concatenate([corpus_t[None], answer_masks]),
                                              logits_dtype=logits_dtype, lse_impl=cfg.lse_impl, kernel_mesh=model.kernel_mesh)
    diag = {"tokens": jnp.sum(mask), "corpus_loss_sum": sums[0], "corpus_tokens": jnp.sum(corpus_t)}
    for j, p in enumerate(parts):
        diag[f"{p}answer_loss_sum"] = sums[1 + j]
        diag[f"{p}answer_tokens"] = jnp.sum(answer_masks[j])
    for g in range(len(cfg.groups)):
        indices = state["intermediates"][f"retrieval_indices_g{g}"][0]
        recall, weight, valid = needle_stats(indices, state["intermediates"][f"retrieval_weights_g{g}"][0], answer,
                                             batch["needle"], cfg.chunk_size)
        for j, p in enumerate(parts):
            diag[f"{p}recall_g{g}_sum"] = jnp.sum(recall * rows[j])
            diag[f"{p}recall_g{g}_count"] = jnp.sum(valid * rows[j])
            diag[f"{p}needle_weight_g{g}_sum"] = jnp.sum(weight * rows[j])
            diag[f"{p}needle_weight_g{g}_count"] = diag[f"{p}recall_g{g}_count"]
    return mean * count, (count, diag)


def diagnostic_means(sums: dict) -> dict:
    """Sums of `_loss_sum`'s diagnostics -> {"corpus_loss", "answer_loss", "recall_g0", "needle_weight_g0",
    ..., and per task "answer_loss/<task>", "recall_g0/<task>", ...}, leaving out those with nothing
    counted."""
    parts = {}  # "" (the whole batch) or a task name -> its sums, without the prefix
    for k, v in sums.items():
        prefix, _, key = k.rpartition("/")
        parts.setdefault(prefix, {})[key] = v
    out = {}
    for prefix, part in sorted(parts.items()):
        pairs = [("corpus_loss", "corpus_loss_sum", "corpus_tokens"), ("answer_loss", "answer_loss_sum", "answer_tokens")]
        pairs += [(k[: -len("_sum")], k, k[: -len("_sum")] + "_count") for k in part
                  if k.startswith(("recall_", "needle_weight_")) and k.endswith("_sum")]
        for name, num, den in pairs:
            if num in part and float(part[den]) > 0:
                out[f"{name}/{prefix}" if prefix else name] = float(part[num]) / float(part[den])
    return out


def make_train_step(cfg: ModelConfig, tx, schedule, spec: StateSpec, batch_sharding, *, grad_accum: int, block_size: int,
                    batch_keys=("tokens", "mask"), answer_weight: float = 1.0, logits_dtype: str = "float32",
                    tasks: tuple[str, ...] = ()):
    """Returns jit(step)(state, batch) -> (state, metrics) with explicit in/out shardings. batch holds
    `batch_keys` (int32 [B, T] each); with task fields ("answer", "needle"[, "task"]) metrics["diagnostics"]
    holds the sums of `_loss_sum`'s diagnostics (see `diagnostic_means`), per task of `tasks` (the
    mixture's names, in order) too where there are several. Attention and GCA kernels run per shard
    of `spec.kernels` (pallas_kernels.per_shard), so XLA never partitions a custom call."""
    model = DRT(cfg, kernel_mesh=spec.kernels)

    def step(state, batch):
        params = state["params"]
        key = jax.random.fold_in(state["rng"], state["step"])
        B, T = batch["tokens"].shape
        micro = B // grad_accum

        def split(x):
            # Row b*grad_accum + a goes to micro-batch a, so every device keeps its rows.
            x = x.reshape(micro, grad_accum, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, NamedSharding(spec.mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec)))

        grad_fn = jax.value_and_grad(
            lambda p, b, k: _loss_sum(model, cfg, p, b, k, deterministic=False, block_size=block_size,
                                      answer_weight=answer_weight, logits_dtype=logits_dtype, tasks=tuple(tasks)),
            has_aux=True,
        )
        if grad_accum == 1:
            (loss_sum, (count, diag)), grads = grad_fn(params, batch, key)
        else:
            micro_batches = {k: split(v) for k, v in batch.items()}

            def body(carry, i):
                (loss_i, aux), g = grad_fn(params, {k: v[i] for k, v in micro_batches.items()}, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (g, loss_i, aux)), None

            zero_aux = jax.eval_shape(lambda: grad_fn(params, {k: v[0] for k, v in micro_batches.items()}, key)[0][1])
            init = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (params, jnp.zeros((), jnp.float32), zero_aux))
            (grads, loss_sum, (count, diag)), _ = jax.lax.scan(body, init, jnp.arange(grad_accum))
        denom = jnp.maximum(count, 1.0)  # the weight sum: answer tokens count answer_weight times
        tokens = diag.pop("tokens", count)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss_sum / denom, "tokens": tokens, "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]), "param_norm": optax.tree.norm(new_params),
        }
        if diag:
            metrics["diagnostics"] = diag
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, metrics

    rep = mesh_lib.replicated(spec.mesh)
    batch_sh = {k: batch_sharding for k in batch_keys}
    return jax.jit(step, in_shardings=(spec.shardings, batch_sh), out_shardings=(spec.shardings, rep), donate_argnums=(0,))


def make_eval_step(cfg: ModelConfig, spec: StateSpec, batch_sharding, *, block_size: int, logits_dtype: str = "float32"):
    """jit(eval)(params, batch) -> (loss_sum, count), deterministic (no dropout, no Gumbel noise)."""
    model = DRT(cfg, kernel_mesh=spec.kernels)

    def evaluate(params, batch):
        loss_sum, (count, _) = _loss_sum(model, cfg, params, batch, jax.random.PRNGKey(0), deterministic=True,
                                         block_size=block_size, logits_dtype=logits_dtype)
        return loss_sum, count

    rep = mesh_lib.replicated(spec.mesh)
    return jax.jit(evaluate, in_shardings=(spec.param_shardings, {"tokens": batch_sharding, "mask": batch_sharding}),
                   out_shardings=(rep, rep))


# remat="auto" tries these in turn: the least recomputation first.
REMAT_SEARCH = ("none", "dots", "full")
# The share of the device's free memory a training step may allocate; the rest is for the eval step,
# the prefetched batches and the allocator's fragmentation.
STEP_MEMORY_SHARE = 0.85


def step_bytes(compiled) -> int | None:
    """Device bytes a compiled step allocates beyond its arguments (already resident): temporaries, and
    outputs that do not reuse a donated input. None where the backend has no memory analysis."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes)


# JAX's GPU allocator takes this share of the GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
JAX_DEFAULT_POOL_FRACTION = 0.75
POOL_FRACTION_HINT = 0.95


def pool_hint(need_none: int, free: int, env=None, backend: str | None = None) -> str:
    """What to say when remat auto had to recompute but the step without remat would fit a larger JAX
    memory pool: on a GPU whose pool is JAX's default 75%, the free memory at a 95% pool is `free` plus
    the extra 20% of the GPU (estimated from the default pool's limit). "" where that does not apply."""
    env = os.environ if env is None else env
    backend = jax.default_backend() if backend is None else backend
    if backend != "gpu" or "XLA_PYTHON_CLIENT_MEM_FRACTION" in env or env.get("XLA_PYTHON_CLIENT_PREALLOCATE") == "false":
        return ""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return ""
    gpu = stats["bytes_limit"] / JAX_DEFAULT_POOL_FRACTION
    larger = free + gpu * (POOL_FRACTION_HINT - JAX_DEFAULT_POOL_FRACTION)
    if need_none > STEP_MEMORY_SHARE * larger:
        return ""
    return (f"; none needs {need_none / 2**30:.2f} GiB, which fits if JAX may take more of the GPU: "
            f"XLA_PYTHON_CLIENT_MEM_FRACTION={POOL_FRACTION_HINT} (JAX takes {JAX_DEFAULT_POOL_FRACTION:.0%} by default)")


def resolve_remat(cfg: ModelConfig, build, args, *, free_bytes: int | None = None, say=print):
    """-> (cfg, step). For cfg.remat "auto": the first of REMAT_SEARCH whose compiled step fits
    STEP_MEMORY_SHARE of the device's free memory, and that step already compiled (so the trainer does
    not compile it twice); where the device does not report its memory (CPU), "none". Otherwise cfg and
    build(cfg) as they are. build(cfg) -> jitted step; args: its abstract arguments (ShapeDtypeStruct
    with shardings); free_bytes: the memory to fit (default: what the device reports free)."""
    if cfg.remat != "auto":
        return cfg, build(cfg)
    free = device_free_bytes() if free_bytes is None else free_bytes
    if free is not None and jax.process_count() > 1:
        # Every process must compile the same program: all fit the smallest free memory among them.
        from jax.experimental import multihost_utils

        free = int(multihost_utils.process_allgather(jnp.asarray(free, jnp.float32)).min())
    if free is None:
        say("remat auto: the device reports no memory limit; training with remat=none")
        cfg = cfg.replace(remat="none")
        return cfg, build(cfg)
    tried, needs = [], {}
    for policy in REMAT_SEARCH:
        compiled = build(cfg.replace(remat=policy)).lower(*args).compile()
        need = needs[policy] = step_bytes(compiled)
        if need is None:
            say(f"remat auto: the compiler gives no memory analysis; training with remat={policy}")
            return cfg.replace(remat=policy), compiled
        tried.append(f"{policy}: {need / 2**30:.2f} GiB")
        if need <= STEP_MEMORY_SHARE * free:
            hint = pool_hint(needs["none"], free) if policy != "none" else ""
            say(f"remat auto: {policy} (the step allocates {need / 2**30:.2f} GiB of {free / 2**30:.2f} GiB free){hint}")
            return cfg.replace(remat=policy), compiled
    raise ConfigError(
        f"the training step does not fit {STEP_MEMORY_SHARE:.0%} of the device's {free / 2**30:.2f} GiB free with any "
        f"remat ({'; '.join(tried)}); lower train.batch or data.seq_len, or raise train.grad_accum or mesh.fsdp"
    )
