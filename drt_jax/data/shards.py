"""Tokenize a corpus once into token shards on disk.

Layout of one shard directory (under `cache_dir`):
  tokens.bin     flat token ids of all documents back to back, uint16 when the
                 vocabulary fits in 16 bits, else uint32; read through np.memmap.
  offsets.npy    int64 [num_docs + 1]; document d is tokens[offsets[d]:offsets[d+1]].
  split_keys.npy uint64 [num_docs], python-all only: the first 8 bytes of each
                 document's SHA-256, which decide its split (see TokenShards.split).
  manifest.json  tokenizer identity, source files (path, size, mtime_ns), counts.
                 Written last, so its presence marks a complete build.

Documents carry no eos; packed mode inserts one between documents when reading.
The shards are reused while the manifest's inputs (sources, tokenizer, reader
settings) match the current ones, and rebuilt otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from drt_jax.data import python_sources
from drt_jax.data.config import DataError
from drt_jax.data.corpora import (
    NAMED_CORPORA,
    ReadStats,
    SourceFile,
    accept_source,
    list_source_files,
    read_file_documents,
)
from drt_jax.data.tokenizers import Tokenizer

logger = logging.getLogger(__name__)

SHARD_FORMAT_VERSION = 1
# The split must not move when the training seed changes, or validation
# documents would leak into training across runs.
SPLIT_SEED = 0x5EED
_ENCODE_CHUNK = 256
# Below this many files, starting worker processes (each imports jax through drt_jax) costs more
# than reading the files in-process.
_PARALLEL_MIN_FILES = 2048
_MAX_WORKERS = 16
_INPUT_KEYS = ("version", "corpus", "format", "text_field", "tokenizer", "min_doc_tokens", "sources")


class TokenShards:
    """A built shard directory: token memmap, document offsets and manifest."""

    def __init__(self, directory: str | os.PathLike, built: bool = False):
        self.directory = Path(directory)
        self.built = built
        with open(self.directory / "manifest.json") as fh:
            self.manifest = json.load(fh)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.tokens_path = str(self.directory / "tokens.bin")
        self.offsets = np.load(self.directory / "offsets.npy")
        keys_path = self.directory / "split_keys.npy"
        self.split_keys = np.load(keys_path) if self.manifest.get("split") == "content-hash" else None

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def tokens(self) -> np.memmap:
        """All tokens, [num_tokens] of `dtype`, memory-mapped read-only."""
        return np.memmap(self.tokens_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    def document(self, d: int) -> np.ndarray:
        """Tokens of document d, int32 [length]."""
        return np.asarray(self.tokens()[self.offsets[d] : self.offsets[d + 1]], dtype=np.int32)

    def split(self, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """Deterministic document split -> (train_ids, val_ids), sorted int64.

        Shards with split keys (python-all) hold out each document whose
        content hash falls below val_fraction (python_sources.is_heldout): a
        document's side depends on its content alone, not on the machine, the
        file order or the other documents, and the held-out share is
        val_fraction on average. Other shards hold out round(n * val_fraction)
        documents of a seeded permutation. With val_fraction > 0 and at least
        two documents, both sides get at least one document.
        """
        n = self.num_docs
        if self.split_keys is not None:
            val = python_sources.is_heldout(self.split_keys, val_fraction)
            if val_fraction > 0 and n >= 2:
                # Only tiny corpora get here; moving the extreme keys keeps the rule monotone.
                if not val.any():
                    val[np.argmin(self.split_keys)] = True
                if val.all():
                    val[np.argmax(self.split_keys)] = False
            ids = np.arange(n, dtype=np.int64)
            return ids[~val], ids[val]
        n_val = int(round(n * val_fraction))
        if val_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        perm = np.random.default_rng(SPLIT_SEED).permutation(n)
        return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def split_stream(shards: TokenShards, doc_ids: np.ndarray, eos_id: int, max_tokens: int) -> np.ndarray:
    """The documents `doc_ids` joined as d0 eos d1 eos ..., int32 [<= max_tokens] (a NIAH haystack, a
    held-out stream for perplexity)."""
    parts, total = [], 0
    for d in doc_ids:
        doc = np.asarray(shards.document(int(d)), np.int32)
        parts += [doc, np.asarray([eos_id], np.int32)]
        total += len(doc) + 1
        if total >= max_tokens:
            break
    return np.concatenate(parts)[:max_tokens] if parts else np.zeros(0, np.int32)


def split_tokens(cfg, tokenizer: Tokenizer, split: str, max_tokens: int, *, progress: bool = False) -> np.ndarray:
    """The first max_tokens of a corpus split as one stream (`split_stream`), int32.

    cfg: a DataConfig (corpus, cache_dir, format, val_fraction, ...: the same shards and split as
    training); split: "train" or "val".
    """
    from drt_jax.data.config import DataError

    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    shards = prepare_shards(cfg.corpus, tokenizer, cfg.cache_dir, fmt=cfg.format, text_field=cfg.text_field,
                            min_doc_tokens=cfg.min_doc_tokens, progress=progress)
    train_ids, val_ids = shards.split(cfg.val_fraction)
    ids = train_ids if split == "train" else val_ids
    if len(ids) == 0:
        raise DataError(f"the {split} split of corpus {cfg.corpus!r} is empty; set data.val_fraction > 0 or add documents")
    return split_stream(shards, ids, tokenizer.eos_id, max_tokens)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def prepare_shards(
    corpus: str,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike,
    *,
    fmt: str = "auto",
    text_field: str = "text",
    min_doc_tokens: int = 1,
    progress: bool = True,
    workers: int | None = None,
) -> TokenShards:
    """Returns current token shards for `corpus`, building them if needed.

    Args:
      corpus: a file, a folder, or a name in corpora.NAMED_CORPORA.
      workers: processes that read and check python-all's files (default:
        the usable CPUs, at most 16); the shards do not depend on it.

    Raises:
      DataError: the corpus path is missing or holds no document of at least
        `min_doc_tokens` tokens.
    """
    files = list_source_files(corpus, fmt)
    corpus_id = corpus if corpus in NAMED_CORPORA else os.path.abspath(os.path.expanduser(corpus))
    inputs = {
        "version": SHARD_FORMAT_VERSION,
        "corpus": corpus_id,
        "format": fmt,
        "text_field": text_field,
        "tokenizer": {
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "pad_id": tokenizer.pad_id,
            "eos_id": tokenizer.eos_id,
            "landmark_id": tokenizer.landmark_id,
        },
        "min_doc_tokens": min_doc_tokens,
        "sources": [[f.path, f.size, f.mtime_ns] for f in files],
    }
    directory = Path(os.path.expanduser(os.fspath(cache_dir))) / _directory_name(inputs)
    manifest_path = directory / "manifest.json"
    if manifest_path.exists():
        with open(manifest_path) as fh:
            old = json.load(fh)
        if all(old.get(k) == inputs[k] for k in _INPUT_KEYS):
            logger.info("token shards are current: %s", directory)
            return TokenShards(directory)
        logger.info("corpus or tokenizer changed; rebuilding token shards in %s", directory)
    if not files:
        raise DataError(f"corpus {corpus_id!r} contains no documents (no .txt/.jsonl/.parquet files found)")
    _build(directory, files, inputs, tokenizer, text_field, min_doc_tokens, progress, workers)
    return TokenShards(directory, built=True)


def _directory_name(inputs: dict) -> str:
    # Source stats are left out so a changed file rebuilds in place instead of
    # leaving stale directories behind.
    key = {k: v for k, v in inputs.items() if k != "sources"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    stem = inputs["corpus"] if inputs["corpus"] in NAMED_CORPORA else Path(inputs["corpus"]).stem
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:40] or "corpus"
    return f"{slug}-{digest}"


def _encode_file(
    tokenizer: Tokenizer, f: SourceFile, text_field: str, stats: ReadStats
) -> Iterator[np.ndarray]:
    """Yields int64 token arrays, one per document of `f`."""
    docs = read_file_documents(f, text_field=text_field, stats=stats)
    if hasattr(tokenizer, "encode_bytes"):
        for doc in docs:
            yield np.frombuffer(tokenizer.encode_bytes(doc), dtype=np.uint8).astype(np.int64)
        return
    batch_encode = getattr(tokenizer, "encode_batch", None)
    if batch_encode is None:
        for doc in docs:
            yield np.asarray(tokenizer.encode(doc), dtype=np.int64)
        return
    chunk: list[str] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == _ENCODE_CHUNK:
            yield from (np.asarray(ids, dtype=np.int64) for ids in batch_encode(chunk))
            chunk = []
    if chunk:
        yield from (np.asarray(ids, dtype=np.int64) for ids in batch_encode(chunk))


def _file_documents(files, tokenizer, text_field, stats, bar) -> Iterator[tuple[np.ndarray, None]]:
    """(token ids, no split key) of every document of `files`, in order."""
    for f in files:
        for ids in _encode_file(tokenizer, f, text_field, stats):
            yield ids, None
        bar.update(f.size)


def _load_sources(paths: list[str], workers: int | None) -> Iterator[python_sources.LoadedSource]:
    """python_sources.load_source over `paths`, in order, in worker processes when it pays."""
    if workers is None:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = min(usable or 1, _MAX_WORKERS)
    if workers <= 1 or len(paths) < _PARALLEL_MIN_FILES:
        yield from map(python_sources.load_source, paths)
        return
    # spawn, not fork: the caller may already run jax's threads, which a fork would copy mid-flight.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(python_sources.load_source, paths, chunksize=64)


def _source_documents(files, tokenizer, stats, bar, workers) -> Iterator[tuple[np.ndarray, int]]:
    """(token ids, split key) of every accepted, first-seen "source" file, in file order."""

    def new_documents() -> Iterator[tuple[bytes, int]]:
        seen: set[bytes] = set()
        for f, loaded in zip(files, _load_sources([f.path for f in files], workers), strict=True):
            bar.update(f.size)
            if accept_source(loaded, seen, stats):
                stats.documents += 1
                yield loaded.data, python_sources.split_key(loaded.digest)

    if hasattr(tokenizer, "encode_bytes"):
        # Accepted files are valid UTF-8, so their bytes are already the byte-level tokens.
        for data, key in new_documents():
            yield np.frombuffer(data, dtype=np.uint8), key
        return
    chunk: list[tuple[bytes, int]] = []
    for item in new_documents():
        chunk.append(item)
        if len(chunk) == _ENCODE_CHUNK:
            yield from _encode_chunk(tokenizer, chunk)
            chunk = []
    if chunk:
        yield from _encode_chunk(tokenizer, chunk)


def _encode_chunk(tokenizer, chunk: list[tuple[bytes, int]]) -> Iterable[tuple[np.ndarray, int]]:
    texts = [data.decode("utf-8") for data, _ in chunk]
    batch_encode = getattr(tokenizer, "encode_batch", None)
    encoded = batch_encode(texts) if batch_encode is not None else map(tokenizer.encode, texts)
    return ((np.asarray(ids, dtype=np.int64), key) for ids, (_, key) in zip(encoded, chunk, strict=True))


def _build(directory, files, inputs, tokenizer, text_field, min_doc_tokens, progress, workers):
    from tqdm.auto import tqdm

    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / "manifest.json"
    manifest_path.unlink(missing_ok=True)
    # Unique temp names let hosts sharing a cache_dir build concurrently; the
    # renames are atomic and every host writes identical bytes.
    suffix = f".tmp.{socket.gethostname()}.{os.getpid()}"
    dtype = token_dtype(tokenizer.vocab_size)
    stats = ReadStats()
    offsets = [0]
    keys: list[int] = []
    skipped_short = 0
    content_hash = files[0].format == "source"
    tokens_tmp = directory / ("tokens.bin" + suffix)
    bar = tqdm(
        total=sum(f.size for f in files),
        unit="B",
        unit_scale=True,
        desc=f"tokenizing corpus {Path(inputs['corpus']).name}",
        disable=not progress,
    )
    with open(tokens_tmp, "wb") as out, bar:
        if content_hash:
            documents = _source_documents(files, tokenizer, stats, bar, workers)
        else:
            documents = _file_documents(files, tokenizer, text_field, stats, bar)
        for ids, key in documents:
            if len(ids) < min_doc_tokens:
                skipped_short += 1
                continue
            out.write(ids.astype(dtype))
            offsets.append(offsets[-1] + len(ids))
            keys.append(key)
            if len(offsets) % 256 == 0:
                bar.set_postfix(docs=len(offsets) - 1, tokens=offsets[-1], refresh=False)
    if skipped_short:
        logger.warning("skipped %d documents shorter than min_doc_tokens=%d", skipped_short, min_doc_tokens)
    if stats.non_utf8 or stats.bad_records:
        logger.warning(
            "corpus %s: %d non-UTF-8 inputs decoded with replacement, %d bad records skipped",
            inputs["corpus"],
            stats.non_utf8,
            stats.bad_records,
        )
    if content_hash:
        logger.info(
            "corpus %s: %d of %d files kept, %d exact duplicates (%d bytes) dropped, rejected: %s",
            inputs["corpus"],
            stats.documents,
            len(files),
            stats.duplicates,
            stats.duplicate_bytes,
            stats.rejected,
        )
    if len(offsets) == 1:
        tokens_tmp.unlink(missing_ok=True)
        raise DataError(
            f"corpus {inputs['corpus']!r} contains no documents with at least {min_doc_tokens} tokens "
            f"({stats.documents} read, {skipped_short} too short); add data or lower min_doc_tokens"
        )
    offsets_tmp = directory / ("offsets.npy" + suffix)
    with open(offsets_tmp, "wb") as fh:
        np.save(fh, np.asarray(offsets, dtype=np.int64))
    if content_hash:
        keys_tmp = directory / ("split_keys.npy" + suffix)
        with open(keys_tmp, "wb") as fh:
            np.save(fh, np.asarray(keys, dtype=np.uint64))
        os.replace(keys_tmp, directory / "split_keys.npy")
    os.replace(tokens_tmp, directory / "tokens.bin")
    os.replace(offsets_tmp, directory / "offsets.npy")
    manifest = dict(inputs)
    manifest.update(
        dtype=dtype.name,
        num_docs=len(offsets) - 1,
        num_tokens=offsets[-1],
        split="content-hash" if content_hash else "permutation",
        documents_read=stats.documents,
        skipped_short=skipped_short,
        non_utf8=stats.non_utf8,
        bad_records=stats.bad_records,
    )
    if content_hash:
        manifest.update(
            roots=python_sources.python_roots(),
            candidate_files=len(files),
            candidate_bytes=sum(f.size for f in files),
            duplicates=stats.duplicates,
            duplicate_bytes=stats.duplicate_bytes,
            rejected=stats.rejected,
        )
    manifest_tmp = directory / ("manifest.json" + suffix)
    with open(manifest_tmp, "w") as fh:
        json.dump(manifest, fh, indent=1)
    os.replace(manifest_tmp, manifest_path)
    logger.info(
        "wrote %d documents, %d tokens (%s) to %s", len(offsets) - 1, offsets[-1], dtype.name, directory
    )
