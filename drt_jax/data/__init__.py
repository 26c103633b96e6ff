"""Data pipeline for drt-jax: tokenizers, corpora, token shards, grain iterators.

The public entry points are re-exported here; see each module for details. The grain-backed
modules (pipeline, mixture) load on first use, so configs and tokenizers work where grain is absent
(e.g. a benchmark on a GPU image without it).
"""

import importlib

from drt_jax.data.config import DataConfig, DataError
from drt_jax.data.corpora import corpus_documents, default_corpus_path, iter_documents, list_source_files
from drt_jax.data.shards import TokenShards, prepare_shards
from drt_jax.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

_LAZY = {
    "register_task": "mixture", "registered_tasks": "mixture",
    "build_eval_iterator": "pipeline", "build_train_iterator": "pipeline", "make_dataset": "pipeline",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"drt_jax.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'drt_jax.data' has no attribute {name!r}")

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "DataError",
    "HFTokenizer",
    "TokenShards",
    "Tokenizer",
    "build_eval_iterator",
    "build_train_iterator",
    "corpus_documents",
    "default_corpus_path",
    "iter_documents",
    "list_source_files",
    "load_tokenizer",
    "make_dataset",
    "prepare_shards",
    "register_task",
    "registered_tasks",
]
