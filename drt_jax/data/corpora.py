"""Reading documents from text corpora on disk.

A corpus is a file or a folder (searched recursively). Formats:
  * txt (also *.py for the default corpus): one file is one document;
  * jsonl: one JSON object per line, text under `text_field`;
  * parquet: text column `text_field`, read one row group at a time.

Bad input never crashes a run: non-UTF-8 bytes are replaced (U+FFFD) and
counted, malformed JSON lines and missing fields are skipped and counted, and
each is reported in a log warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from drt_jax.data.config import DataError

logger = logging.getLogger(__name__)

DEFAULT_CORPUS = "default"
_SUFFIX_FORMAT = {".txt": "txt", ".py": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
_FORMAT_SUFFIXES = {"txt": (".txt",), "jsonl": (".jsonl",), "parquet": (".parquet",)}
# Tests and vendored packages would dominate and duplicate the stdlib corpus.
_DEFAULT_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One input file; size and mtime decide whether token shards are current."""

    path: str
    format: str
    size: int
    mtime_ns: int


@dataclasses.dataclass
class ReadStats:
    """Counts of problems met while reading; filled in by `iter_documents`."""

    documents: int = 0
    non_utf8: int = 0
    bad_records: int = 0


def default_corpus_path() -> str:
    """The running Python's standard library folder (its *.py files are the
    built-in corpus, so no download is needed)."""
    return sysconfig.get_paths()["stdlib"]


def list_source_files(corpus: str, fmt: str = "auto") -> list[SourceFile]:
    """Lists the corpus files in a deterministic (sorted) order.

    Args:
      corpus: a file, a folder, or "default".
      fmt: "auto" picks the format by suffix; otherwise every file is read as
        `fmt` (and folders are searched for that format's suffix only).
    """
    if corpus == DEFAULT_CORPUS:
        root = Path(default_corpus_path())
        paths = [
            p
            for p in root.rglob("*.py")
            if not _DEFAULT_EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
        ]
        fmt = "txt"
    else:
        root = Path(os.path.expanduser(corpus))
        if root.is_file():
            paths = [root]
        elif root.is_dir():
            suffixes = (".txt", ".jsonl", ".parquet") if fmt == "auto" else _FORMAT_SUFFIXES[fmt]
            paths = [p for p in root.rglob("*") if p.suffix in suffixes and p.is_file()]
        else:
            raise DataError(
                f"corpus path {str(root)!r} does not exist; pass an existing file or folder, or corpus='default'"
            )
    files = []
    for p in sorted(paths):
        file_fmt = _SUFFIX_FORMAT.get(p.suffix, "txt") if fmt == "auto" else fmt
        st = p.stat()
        files.append(SourceFile(str(p), file_fmt, st.st_size, st.st_mtime_ns))
    return files


def iter_documents(
    files: Iterable[SourceFile],
    *,
    text_field: str = "text",
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Yields the documents of `files` in order. Problems are counted in `stats`."""
    stats = ReadStats() if stats is None else stats
    for f in files:
        yield from read_file_documents(f, text_field=text_field, stats=stats)


def read_file_documents(
    f: SourceFile, *, text_field: str = "text", stats: ReadStats | None = None
) -> Iterator[str]:
    """Yields the documents of one file."""
    stats = ReadStats() if stats is None else stats
    readers = {"txt": _read_txt, "jsonl": _read_jsonl, "parquet": _read_parquet}
    for doc in readers[f.format](f.path, text_field, stats):
        stats.documents += 1
        yield doc


def _decode(raw: bytes, path: str, stats: ReadStats, where: str = "") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        stats.non_utf8 += 1
        logger.warning("non-UTF-8 bytes in %s%s (%s); replaced with U+FFFD", path, where, e.reason)
        return raw.decode("utf-8", errors="replace")


def _read_txt(path: str, text_field: str, stats: ReadStats) -> Iterator[str]:
    with open(path, "rb") as fh:
        yield _decode(fh.read(), path, stats)


def _read_jsonl(path: str, text_field: str, stats: ReadStats) -> Iterator[str]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            line = _decode(raw, path, stats, f" line {lineno}")
            try:
                record = json.loads(line)
                text = record[text_field]
            except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
                stats.bad_records += 1
                logger.warning(
                    "skipping %s line %d: no string field %r (%s)", path, lineno, text_field, type(e).__name__
                )
                continue
            if not isinstance(text, str):
                stats.bad_records += 1
                logger.warning(
                    "skipping %s line %d: field %r is %s, not str",
                    path,
                    lineno,
                    text_field,
                    type(text).__name__,
                )
                continue
            yield text


def _read_parquet(path: str, text_field: str, stats: ReadStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise DataError(
            f"parquet file {path!r} has no column {text_field!r} (columns: {pf.schema_arrow.names}); set text_field"
        )
    for group in range(pf.num_row_groups):
        column = pf.read_row_group(group, columns=[text_field]).column(0)
        for row, value in enumerate(column.to_pylist()):
            if isinstance(value, bytes):
                value = _decode(value, path, stats, f" row group {group} row {row}")
            if not isinstance(value, str):
                stats.bad_records += 1
                continue
            yield value
