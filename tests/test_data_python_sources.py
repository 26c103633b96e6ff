"""The python-all built-in corpus on a fake installation: file kinds, dedup, split by content."""

import hashlib

import numpy as np
import pytest

from drt_jax.data import (
    ByteTokenizer,
    DataError,
    corpus_documents,
    list_source_files,
    prepare_shards,
    python_sources,
    shards,
)
from drt_jax.data.corpora import ReadStats
from drt_jax.tasks.niah import default_haystack

TOK = ByteTokenizer()
# Distinct accepted texts; "copy" files repeat some of them under other names and suffixes.
TEXTS = [f"def f{i}():\n    return {i} * 'x'\n# {'y' * i}\n" for i in range(24)]


def fake_install(base, order=1):
    """A stdlib root and a site-packages root holding TEXTS (some twice) and every excluded kind.

    order=-1 lays the same contents out under other names (and so in another sorted order).
    Returns (roots, texts of the accepted unique documents).
    """
    stdlib, site_packages = base / "lib" / "python3", base / "venv" / "site-packages"
    for root in (stdlib, site_packages, stdlib / "site-packages" / "foreign"):
        root.mkdir(parents=True)
    suffixes = [".py", ".pyi", ".md", ".rst", ".txt", ".c", ".h"]
    for i, text in enumerate(TEXTS[::order]):
        root = stdlib if i % 2 else site_packages
        (root / f"pkg{i % 3}").mkdir(exist_ok=True)
        (root / f"pkg{i % 3}" / f"m{i:02d}{suffixes[i % len(suffixes)]}").write_text(text)
    for i in range(0, len(TEXTS), 4):
        (site_packages / f"copy{i}.txt").write_text(TEXTS[i])
    rejected = {
        "binary.py": b"x = 1\n\0\0",
        "latin1.py": "caf\xe9 = 1\n".encode("latin-1"),
        "minified.txt": b"a" * (python_sources.MAX_LINE_BYTES + 1),
        "empty.py": b"",
    }
    for name, data in rejected.items():
        (site_packages / name).write_bytes(data)
    never_read = {
        "huge.py": "# big\n" * (python_sources.MAX_FILE_BYTES // 6 + 1),
        "data.json": '{"not": "text"}',
        "ext.so": "not a source suffix",
        "__pycache__/m.py": "cached",
        ".git/hooks.py": "hidden folder",
        "pkg-1.0.dist-info/LICENSE.txt": "package metadata",
    }
    for name, text in never_read.items():
        (site_packages / name).parent.mkdir(exist_ok=True)
        (site_packages / name).write_text(text)
    # Another interpreter's packages inside the stdlib folder are not this Python's.
    (stdlib / "site-packages" / "foreign" / "other.py").write_text("not installed here")
    return [str(stdlib), str(site_packages)], set(TEXTS)


@pytest.fixture
def install(tmp_path, monkeypatch):
    roots, texts = fake_install(tmp_path / "a")
    monkeypatch.setattr(python_sources, "python_roots", lambda: roots)
    return texts


def test_lists_only_source_kinds_and_reads_each_content_once(install):
    names = {p.rsplit("/", 1)[-1] for p in (f.path for f in list_source_files("python-all"))}
    assert {"binary.py", "latin1.py", "minified.txt", "empty.py", "copy0.txt"} <= names
    assert not names & {"huge.py", "data.json", "ext.so", "hooks.py", "LICENSE.txt", "other.py"}
    assert {f.format for f in list_source_files("python-all")} == {"source"}
    stats = ReadStats()
    docs = list(corpus_documents("python-all", stats=stats))
    assert len(docs) == len(set(docs)) and set(docs) == install
    assert stats.duplicates == 6
    assert stats.rejected == {"binary": 1, "not UTF-8": 1, "long lines": 1, "empty": 1}


def test_shards_hold_unique_documents_split_by_content_hash(install, tmp_path, monkeypatch):
    built = prepare_shards("python-all", TOK, tmp_path / "cache", progress=False, workers=1)
    docs = [TOK.decode(built.document(d)) for d in range(built.num_docs)]
    assert sorted(docs) == sorted(install)
    assert built.manifest["duplicates"] == 6 and built.manifest["split"] == "content-hash"
    assert not prepare_shards("python-all", TOK, tmp_path / "cache", progress=False).built

    train, val = built.split(0.5)
    key = {t: int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") for t in install}
    assert {docs[d] for d in val} == {t for t in install if key[t] < 2**63}
    assert set(train.tolist()) | set(val.tolist()) == set(range(built.num_docs))
    # A fraction too small for any key still holds out one document: the one with the smallest key.
    assert [docs[d] for d in built.split(1e-12)[1]] == [min(install, key=key.get)]

    # The same contents under other names, in another order and root order: the same split.
    roots, _ = fake_install(tmp_path / "b", order=-1)
    monkeypatch.setattr(python_sources, "python_roots", lambda: roots[::-1])
    moved = prepare_shards("python-all", TOK, tmp_path / "cache", progress=False, workers=1)
    moved_docs = [TOK.decode(moved.document(d)) for d in range(moved.num_docs)]
    assert moved_docs != docs
    for fraction in (0.1, 0.5):
        assert {moved_docs[d] for d in moved.split(fraction)[1]} == {docs[d] for d in built.split(fraction)[1]}


def test_worker_processes_build_the_same_shards(install, tmp_path, monkeypatch):
    serial = prepare_shards("python-all", TOK, tmp_path / "serial", progress=False, workers=1)
    monkeypatch.setattr(shards, "_PARALLEL_MIN_FILES", 1)
    parallel = prepare_shards("python-all", TOK, tmp_path / "parallel", progress=False, workers=2)
    assert parallel.built
    assert np.array_equal(np.asarray(serial.tokens()), np.asarray(parallel.tokens()))
    assert np.array_equal(serial.split_keys, parallel.split_keys)


def test_heldout_rule_is_a_monotone_threshold():
    keys = np.random.default_rng(0).integers(0, 2**64, size=20000, dtype=np.uint64)
    for fraction in (0.01, 0.2):
        held = python_sources.is_heldout(keys, fraction)
        assert abs(held.mean() - fraction) < 0.01
        assert held[python_sources.is_heldout(keys, fraction / 2)].all()
    assert not python_sources.is_heldout(keys, 0.0).any()


def test_niah_haystack_reads_a_named_corpus(install):
    hay = default_haystack(TOK, max_tokens=10_000, corpus="python-all")
    text = TOK.decode(hay)
    assert (hay == TOK.eos_id).sum() == len(install)
    assert all(text.count(t) == 1 for t in install) and "caf" not in text


def test_unknown_corpus_name_is_one_line_error():
    with pytest.raises(DataError) as e:
        list_source_files("python-al")
    message = str(e.value)
    assert "unknown corpus name 'python-al'" in message and "python-all" in message and "\n" not in message


def test_text_tokenizers_see_the_same_documents(install, tmp_path, monkeypatch):
    class TextOnly:
        """Byte ids through encode_batch only, the path of Hugging Face tokenizers."""

        vocab_size, pad_id, eos_id, landmark_id, fingerprint = 259, 256, 257, 258, "text-only"
        encode, decode = TOK.encode, TOK.decode

        def encode_batch(self, texts):
            return [self.encode(t) for t in texts]

    monkeypatch.setattr(shards, "_ENCODE_CHUNK", 5)
    fast = prepare_shards("python-all", TOK, tmp_path / "cache", progress=False, workers=1)
    slow = prepare_shards("python-all", TextOnly(), tmp_path / "cache", progress=False, workers=1)
    assert slow.directory != fast.directory
    assert np.array_equal(np.asarray(fast.tokens()), np.asarray(slow.tokens()))
    assert np.array_equal(fast.offsets, slow.offsets) and np.array_equal(fast.split_keys, slow.split_keys)
