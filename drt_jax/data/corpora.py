"""Reading documents from text corpora on disk.

A corpus is a file, a folder (searched recursively) or a built-in name (`NAMED_CORPORA`):
  * "default": the *.py files of the running Python's standard library (no tests, no packages);
  * "python-all": the source and text files of the standard library and every installed package,
    deduplicated by content (see drt_jax.data.python_sources).
Formats:
  * txt (also *.py for the default corpus): one file is one document;
  * source (python-all's files): one file is one document, checked and deduplicated when read;
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

from drt_jax.data import python_sources
from drt_jax.data.config import DataError

logger = logging.getLogger(__name__)

DEFAULT_CORPUS = "default"
NAMED_CORPORA = (DEFAULT_CORPUS, python_sources.NAME)
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
    duplicates: int = 0  # source files whose exact content was already read
    duplicate_bytes: int = 0
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)  # source files, by reason

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def default_corpus_path() -> str:
    """The running Python's standard library folder (its *.py files are the
    built-in corpus, so no download is needed)."""
    return sysconfig.get_paths()["stdlib"]


def list_source_files(corpus: str, fmt: str = "auto") -> list[SourceFile]:
    """Lists the corpus files in a deterministic (sorted) order.

    Args:
      corpus: a file, a folder, or a name in NAMED_CORPORA.
      fmt: "auto" picks the format by suffix; otherwise every file is read as
        `fmt` (and folders are searched for that format's suffix only).
        Ignored for named corpora.

    Raises:
      DataError: the path does not exist, or the name is not a built-in corpus.
    """
    if corpus == python_sources.NAME:
        paths = [Path(p) for p in python_sources.candidate_paths(python_sources.python_roots())]
        fmt = "source"
    elif corpus == DEFAULT_CORPUS:
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
        elif os.sep not in corpus and "." not in corpus:
            raise DataError(
                f"unknown corpus name {corpus!r}; use one of {', '.join(NAMED_CORPORA)} or an existing file or folder"
            )
        else:
            raise DataError(
                f"corpus path {str(root)!r} does not exist; pass an existing file or folder, "
                f"or a built-in corpus ({', '.join(NAMED_CORPORA)})"
            )
    files = []
    for p in sorted(paths):
        file_fmt = _SUFFIX_FORMAT.get(p.suffix, "txt") if fmt == "auto" else fmt
        try:
            st = p.stat()
        except OSError:  # removed or unreadable since listing (e.g. a package being reinstalled)
            continue
        if fmt == "source" and st.st_size > python_sources.MAX_FILE_BYTES:
            continue
        files.append(SourceFile(str(p), file_fmt, st.st_size, st.st_mtime_ns))
    return files


def corpus_documents(corpus: str, *, text_field: str = "text", stats: ReadStats | None = None) -> Iterator[str]:
    """Yields the documents of a corpus (a path or a name in NAMED_CORPORA) in order, as the token
    shards hold them (python-all's files checked and deduplicated), e.g. for NIAH haystacks."""
    return iter_documents(list_source_files(corpus), text_field=text_field, stats=stats)


def iter_documents(
    files: Iterable[SourceFile],
    *,
    text_field: str = "text",
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Yields the documents of `files` in order. Problems are counted in `stats`; "source" files
    whose content was already yielded are skipped (and counted) too."""
    stats = ReadStats() if stats is None else stats
    seen: set[bytes] = set()
    for f in files:
        if f.format != "source":
            yield from read_file_documents(f, text_field=text_field, stats=stats)
            continue
        loaded = python_sources.load_source(f.path)
        if accept_source(loaded, seen, stats):
            stats.documents += 1
            yield loaded.data.decode("utf-8")


def accept_source(loaded: python_sources.LoadedSource, seen: set[bytes], stats: ReadStats) -> bool:
    """Whether a loaded "source" file is a new document; counts rejects and duplicates in `stats`
    and adds its digest to `seen`."""
    if loaded.reason is not None:
        stats.reject(loaded.reason)
        return False
    if loaded.digest in seen:
        stats.duplicates += 1
        stats.duplicate_bytes += len(loaded.data)
        return False
    seen.add(loaded.digest)
    return True


def read_file_documents(
    f: SourceFile, *, text_field: str = "text", stats: ReadStats | None = None
) -> Iterator[str]:
    """Yields the documents of one file."""
    stats = ReadStats() if stats is None else stats
    readers = {"txt": _read_txt, "source": _read_source, "jsonl": _read_jsonl, "parquet": _read_parquet}
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


def _read_source(path: str, text_field: str, stats: ReadStats) -> Iterator[str]:
    loaded = python_sources.load_source(path)
    if loaded.reason is not None:
        stats.reject(loaded.reason)
        return
    yield loaded.data.decode("utf-8")


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
