"""The docs, code and results speak of the project and of its users' hardware (GPUs, jobs, segments,
wall time), never of how the project's own runs happened to be arranged (issue 26).

Scans README.md, docs/, experiments/ (text, code and raw results), drt_jax/, bench/ and notebooks/ with
plain file reads; binary files (images, TensorBoard events, caches) are skipped.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ("README.md", "docs", "experiments", "drt_jax", "bench", "notebooks")

# Words of our working arrangements, not of the project. A user runs drt-jax on their own GPUs, in
# jobs with a wall-time limit or on spot instances, and writes to an output folder of their choice.
FORBIDDEN = {
    "session": re.compile(r"session", re.I),
    "device time / minutes / seconds": re.compile(r"device[ -](?:time|minutes?|seconds?)\b", re.I),
    "$OUT": re.compile(r"\$\{?OUT\b"),
    "lent": re.compile(r"\blent\b", re.I),
    "a warm machine": re.compile(r"warm machine|\b(?:stay|stays|stayed|still)[- ]warm\b", re.I),
    "the device machine / README": re.compile(r"\bdevice (?:machine|README)\b|\bdevice's\s+\$?OUT\b", re.I),
    "a machine kind name": re.compile(r"\bnvidia-h[12]00(?:-x\d)?\b", re.I),
}

# (path relative to the repository root, the forbidden word's name) -> why that use is legitimate.
# Keep it short; every entry says why. There is none today.
ALLOWED: dict[tuple[str, str], str] = {}


def _files():
    for name in SCANNED:
        path = ROOT / name
        paths = [path] if path.is_file() else sorted(path.rglob("*"))
        for p in paths:
            if not p.is_file() or "__pycache__" in p.parts or any(part.startswith(".") for part in p.relative_to(ROOT).parts):
                continue
            data = p.read_bytes()
            if b"\0" in data[:8192]:
                continue  # binary: images, TensorBoard events, compiled files
            yield p.relative_to(ROOT).as_posix(), data.decode("utf-8", errors="replace")


def offending_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, word name, line) for every forbidden word in text."""
    hits = []
    for i, line in enumerate(text.splitlines(), 1):
        for name, pattern in FORBIDDEN.items():
            if pattern.search(line):
                hits.append((i, name, line.strip()[:160]))
    return hits


def test_no_words_of_our_working_arrangements():
    hits = [f"{path}:{i}: {name!r} in: {line}"
            for path, text in _files()
            for i, name, line in offending_lines(text)
            if (path, name) not in ALLOWED]
    assert not hits, ("say it in the project's terms (GPUs, jobs, segments, wall time, --out folders):\n"
                      + "\n".join(hits[:40]) + (f"\n... and {len(hits) - 40} more" if len(hits) > 40 else ""))


def test_the_scan_reads_every_scanned_root():
    paths = {path.split("/")[0] for path, _ in _files()}
    assert paths == set(SCANNED)


@pytest.mark.parametrize("text", [
    "Seventh session (2026-12-03)", "Device time: 1,716 s of 1,800", "--out $OUT --budget-s 575",
    "the device's $OUT", "a machine lent for a few minutes", "on a warm machine", "a machine that stayed warm",
    "On the still-warm machine", "the device machine runs one command", "the last ~4 device minutes",
    "(`nvidia-h100-x1`)", "device `nvidia-h200`", "the wheels of the device README", "sessions 1-2",
])
def test_the_words_are_caught(text):
    assert offending_lines(text), text


@pytest.mark.parametrize("text", [
    "2% warm-up, cosine", "a warm start", "silent", "equivalent", "host→device copy of the k=8 chunks",
    "one NVIDIA H200 (143,771 MiB)", "--out out/s8", "time-limited jobs on spot instances",
    "output = model(x)", "the device step on the H200",
])
def test_the_projects_own_words_pass(text):
    assert not offending_lines(text), text
