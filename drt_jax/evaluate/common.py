"""Shared pieces of the evaluation commands: loading a model, parsing lengths, reading text."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np


class EvalError(ValueError):
    """A bad evaluation request; the message is one line saying what to change."""


def parse_lengths(text: str) -> list[int]:
    """"2K,16K,1M,4096" -> [2048, 16384, 1048576, 4096]."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*([kKmM]?)", part)
        if not m:
            raise EvalError(f"cannot parse length {part!r}; use integers with optional K/M suffix, e.g. 2K,16K,4096")
        n = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
        if n < 1:
            raise EvalError(f"length {part!r} must be positive")
        out.append(n)
    if not out:
        raise EvalError("no lengths given")
    return out


def parse_floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise EvalError(f"cannot parse {name} {text!r}; give comma-separated numbers, e.g. 0,0.5,1") from None


def _check_params(cfg, params) -> None:
    """Raises EvalError when the weights do not have the shapes the config implies."""
    import flax.linen as nn

    from drt_jax.model import DRT

    tokens = jnp.zeros((1, cfg.slots_per_chunk * 2), jnp.int32)
    want = nn.unbox(jax.eval_shape(lambda: DRT(cfg).init(jax.random.PRNGKey(0), tokens))["params"])
    want_flat = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    have_flat = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for key in sorted(set(want_flat) | set(have_flat)):
        if want_flat.get(key) != have_flat.get(key):
            raise EvalError(
                f"the checkpoint's weights do not match its config {cfg.name!r}: {key} is "
                f"{have_flat.get(key, 'missing')} in the weights, {want_flat.get(key, 'absent')} in the config"
            )


def load_model(checkpoint: str, step: int | None = None, *, dtype: str | None = None, top_k: int | None = None,
               prompt_align: str | None = None):
    """checkpoint: a run folder (train.py's), or "random:PRESET[:SEED]" for a randomly initialised
    model (smoke tests; byte tokenizer when the vocabulary is 259). -> (cfg, params, tokenizer).
    `dtype`, `top_k` and `prompt_align` override the checkpoint's config (none changes the parameters)."""
    from drt_jax.config import ModelConfig

    if checkpoint.startswith("random:"):
        parts = checkpoint.split(":")
        cfg = ModelConfig.from_preset(parts[1])
        seed = int(parts[2]) if len(parts) > 2 else 0
        import flax.linen as nn

        from drt_jax.model import DRT

        params = nn.unbox(DRT(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 32), jnp.int32))["params"])
        spec = "byte" if cfg.vocab_size == 259 else None
        if spec is None:
            raise EvalError(f"random:{parts[1]} has vocabulary {cfg.vocab_size}; only byte-level presets work without a run")
    else:
        if not os.path.isdir(checkpoint):
            raise EvalError(f"checkpoint folder {checkpoint} does not exist; pass the runs/<name> folder train.py wrote")
        from drt_jax.train.checkpoints import load_for_eval

        cfg, params, spec = load_for_eval(checkpoint, step)
        _check_params(cfg, params)
    if dtype:
        cfg = cfg.replace(dtype=dtype)
    if top_k is not None:
        cfg = cfg.replace(top_k=top_k)
    if prompt_align is not None:
        cfg = cfg.replace(prompt_align=prompt_align)
    from drt_jax.data.tokenizers import load_tokenizer

    return cfg, params, load_tokenizer(spec)


def read_split_tokens(data: str, tokenizer, max_tokens: int, split: str, checkpoint: str) -> np.ndarray:
    """Token stream of one split ("train" / "val") of a corpus as training split it: the documents of the
    run's token shards (its cache folder and val_fraction when `checkpoint` is a run folder)."""
    import dataclasses

    from drt_jax.data.config import DataConfig
    from drt_jax.data.shards import split_tokens

    base = DataConfig()
    if os.path.isdir(checkpoint):
        from drt_jax.train.checkpoints import read_run_config

        base = read_run_config(checkpoint).data
        if split == "val" and not base.val_fraction:
            raise EvalError(f"the run {checkpoint} held out no text (data.val_fraction=0); pass --split train or --split all")
    tokens = split_tokens(dataclasses.replace(base, corpus=data), tokenizer, split, max_tokens)
    if tokens.size == 0:
        raise EvalError(f"no text found in the {split} split of {data}")
    return tokens


def read_tokens(data: str, tokenizer, max_tokens: int) -> np.ndarray:
    """Token stream of a corpus (file or folder, or a built-in name: "default", "python-all"),
    documents joined by eos, at most max_tokens."""
    from drt_jax.data.corpora import NAMED_CORPORA, corpus_documents

    if data not in NAMED_CORPORA and not os.path.exists(data):
        raise EvalError(
            f"data path {data} does not exist; pass a text/jsonl/parquet file or folder, "
            f"or a built-in corpus ({', '.join(NAMED_CORPORA)})"
        )
    ids: list[int] = []
    for doc in corpus_documents(data):
        ids.extend(tokenizer.encode(doc))
        ids.append(tokenizer.eos_id)
        if len(ids) >= max_tokens:
            break
    if not ids:
        raise EvalError(f"no text found in {data}")
    return np.asarray(ids[:max_tokens], np.int32)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar (disabled when not a TTY or not wanted)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
