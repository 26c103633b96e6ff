"""Data pipeline for drt-jax: tokenizers, corpora, token shards, grain iterators.

The public entry points are re-exported here; see each module for details.
"""

from drt_jax.data.config import DataConfig, DataError
from drt_jax.data.corpora import default_corpus_path, iter_documents, list_source_files
from drt_jax.data.mixture import register_task, registered_tasks
from drt_jax.data.pipeline import build_eval_iterator, build_train_iterator, make_dataset
from drt_jax.data.shards import TokenShards, prepare_shards
from drt_jax.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "DataError",
    "HFTokenizer",
    "TokenShards",
    "Tokenizer",
    "build_eval_iterator",
    "build_train_iterator",
    "default_corpus_path",
    "iter_documents",
    "list_source_files",
    "load_tokenizer",
    "make_dataset",
    "prepare_shards",
    "register_task",
    "registered_tasks",
]
