"""The "python-all" built-in corpus: every source and text file the running Python has installed.

Roots: the standard library, the site-packages folders (site.getsitepackages(), sysconfig's purelib
and platlib, any site-packages/dist-packages folder on sys.path) and the user site. The current
directory and other sys.path entries are left out, so the corpus does not depend on where a run
starts. Under a root, folders that are caches, metadata or another interpreter's packages are
skipped (`EXCLUDED_DIRS`, hidden folders, *.dist-info, *.egg-info, and site-packages/dist-packages
below a root, e.g. the base interpreter's packages inside a virtual environment's stdlib).

A file is a candidate when its suffix is in `SUFFIXES` and it has at most `MAX_FILE_BYTES`; listing
needs only a stat, so checking whether token shards are current never reads file contents. When
read, a candidate is rejected (and counted by reason) if it holds a NUL byte (binary), a line longer
than `MAX_LINE_BYTES` (minified, generated or data: protobuf descriptors, embedded blobs, tables),
or bytes that are not UTF-8, or if it is empty. Accepted files are deduplicated by the SHA-256 of
their bytes (the first path in sorted order is kept); the digest also decides the held-out split
(see `is_heldout`), so a file lands in the same split on every machine whatever else is installed.

The contents differ between machines because the installed packages differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import site
import sys
import sysconfig
from pathlib import Path

import numpy as np

NAME = "python-all"
SUFFIXES = frozenset(
    {".py", ".pyi", ".pyx", ".pxd", ".pxi", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cu", ".cuh",
     ".md", ".rst", ".txt"}
)
# Hand-written sources are far below 1 MiB; larger files are nearly always generated or data.
MAX_FILE_BYTES = 1 << 20
# Code and prose wrap well below this; minified files, serialized descriptors and tables do not.
MAX_LINE_BYTES = 1000
EXCLUDED_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "dist-packages"})
_EXCLUDED_DIR_SUFFIXES = (".dist-info", ".egg-info")


def python_roots() -> list[str]:
    """The existing installation folders of the running Python, resolved and deduplicated, in a
    fixed order (stdlib, then site-packages folders, then the user site)."""
    paths = sysconfig.get_paths()
    candidates = [paths["stdlib"], *site.getsitepackages(), paths["purelib"], paths["platlib"]]
    candidates += [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    candidates.append(site.getusersitepackages())
    roots: list[str] = []
    for p in candidates:
        resolved = os.path.realpath(p)
        if os.path.isdir(resolved) and resolved not in roots:
            roots.append(resolved)
    return roots


def candidate_paths(roots: list[str]) -> list[str]:
    """Paths of the candidate files under `roots`, sorted, each real file once (symlinks and
    nested roots are followed to one path)."""
    root_set = set(roots)
    found: set[str] = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            # Nested roots are walked on their own; pruning them here avoids listing files twice.
            dirnames[:] = [
                d
                for d in dirnames
                if d not in EXCLUDED_DIRS
                and not d.startswith(".")
                and not d.endswith(_EXCLUDED_DIR_SUFFIXES)
                and os.path.realpath(os.path.join(dirpath, d)) not in root_set
            ]
            for name in filenames:
                if os.path.splitext(name)[1] in SUFFIXES:
                    found.add(os.path.realpath(os.path.join(dirpath, name)))
    return sorted(found)


@dataclasses.dataclass(frozen=True)
class LoadedSource:
    """One candidate file after reading: `data` (its UTF-8 bytes, which are also its byte-level
    tokens) and `digest` (SHA-256 of the bytes) when accepted, else `reason` says why not."""

    data: bytes | None
    digest: bytes | None
    reason: str | None


def load_source(path: str) -> LoadedSource:
    """Reads and checks one candidate file; never raises for unreadable or unsuitable files."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError:
        return LoadedSource(None, None, "unreadable")
    reason = reject_reason(data)
    if reason is not None:
        return LoadedSource(None, None, reason)
    return LoadedSource(data, hashlib.sha256(data).digest(), None)


def reject_reason(data: bytes) -> str | None:
    """Why a file's bytes are not corpus text, or None when they are."""
    if not data:
        return "empty"
    if len(data) > MAX_FILE_BYTES:
        return "too large"
    if b"\0" in data:
        return "binary"
    newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
    line_ends = np.concatenate([[-1], newlines, [len(data)]])
    if int(np.diff(line_ends).max()) - 1 > MAX_LINE_BYTES:
        return "long lines"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    return None


def split_key(digest: bytes) -> int:
    """The document's position in [0, 2**64) for the held-out split: the digest's first 8 bytes."""
    return int.from_bytes(digest[:8], "big")


def is_heldout(keys: np.ndarray, val_fraction: float) -> np.ndarray:
    """bool [n]: the documents with split keys `keys` (uint64 [n]) that are held out.

    A document is held out when its key falls below val_fraction * 2**64, which depends on its
    content alone: not on the other documents, their order, or the machine.
    """
    threshold = np.uint64(min(int(val_fraction * 2.0**64), 2**64 - 1))
    return np.asarray(keys, np.uint64) < threshold
