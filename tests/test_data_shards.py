"""Token shards: built once, reused while current, rebuilt on change."""

import json
import logging
import os

import numpy as np
import pytest

from drt_jax.data import ByteTokenizer, DataError, TokenShards, prepare_shards


def write_corpus(root, n=6):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i}.txt").write_text(f"document {i} " + "x" * (10 * i))
    return root


def test_build_once_then_skip_then_rebuild_on_change(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    tok = ByteTokenizer()
    first = prepare_shards(str(corpus), tok, tmp_path / "cache", progress=False)
    assert first.built
    assert first.num_docs == 6 and first.dtype == np.uint16
    tokens_mtime = os.stat(first.tokens_path).st_mtime_ns

    second = prepare_shards(str(corpus), tok, tmp_path / "cache", progress=False)
    assert not second.built and second.directory == first.directory
    assert os.stat(second.tokens_path).st_mtime_ns == tokens_mtime

    (corpus / "doc0.txt").write_text("changed and longer document zero")
    third = prepare_shards(str(corpus), tok, tmp_path / "cache", progress=False)
    assert third.built and third.directory == first.directory
    assert tok.decode(third.document(0)) == "changed and longer document zero"

    (corpus / "doc6.txt").write_text("a new file")
    fourth = prepare_shards(str(corpus), tok, tmp_path / "cache", progress=False)
    assert fourth.built and fourth.num_docs == 7


def test_contents_offsets_and_manifest(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    tok = ByteTokenizer()
    shards = prepare_shards(str(corpus), tok, tmp_path / "cache", progress=False)
    for i in range(6):
        assert shards.document(i).tolist() == tok.encode((corpus / f"doc{i}.txt").read_text())
    assert shards.offsets.dtype == np.int64 and shards.offsets[0] == 0
    assert shards.tokens().shape == (shards.num_tokens,)
    manifest = json.loads((shards.directory / "manifest.json").read_text())
    assert manifest["tokenizer"]["fingerprint"] == "byte-v1"
    assert manifest["num_docs"] == 6 and manifest["num_tokens"] == shards.num_tokens
    assert [os.path.basename(s[0]) for s in manifest["sources"]] == [f"doc{i}.txt" for i in range(6)]
    assert all(s[1] == os.path.getsize(s[0]) for s in manifest["sources"])


def test_other_tokenizer_gets_other_shards(tmp_path):
    class Shifted(ByteTokenizer):
        fingerprint = "shifted"

    corpus = write_corpus(tmp_path / "corpus")
    a = prepare_shards(str(corpus), ByteTokenizer(), tmp_path / "cache", progress=False)
    b = prepare_shards(str(corpus), Shifted(), tmp_path / "cache", progress=False)
    assert b.built and a.directory != b.directory


def test_short_documents_are_skipped_and_logged(tmp_path, caplog):
    corpus = write_corpus(tmp_path / "corpus")
    with caplog.at_level(logging.WARNING):
        shards = prepare_shards(
            str(corpus), ByteTokenizer(), tmp_path / "cache", min_doc_tokens=25, progress=False
        )
    lengths = np.diff(shards.offsets)
    assert shards.num_docs == 4 and lengths.min() >= 25
    assert "skipped 2 documents shorter than min_doc_tokens=25" in caplog.text


def test_empty_corpus_is_one_line_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        prepare_shards(str(empty), ByteTokenizer(), tmp_path / "cache", progress=False)
    assert str(empty) in str(e.value) and "no documents" in str(e.value) and "\n" not in str(e.value)

    (empty / "blank.txt").write_text("")
    with pytest.raises(DataError) as e:
        prepare_shards(str(empty), ByteTokenizer(), tmp_path / "cache", progress=False)
    assert str(empty) in str(e.value) and "\n" not in str(e.value)


def test_non_utf8_file_is_sharded(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "bad.txt").write_bytes(b"abc\xffdef")
    shards = prepare_shards(str(corpus), ByteTokenizer(), tmp_path / "cache", progress=False)
    assert ByteTokenizer().decode(shards.document(0)) == "abc\ufffddef"
    assert shards.manifest["non_utf8"] == 1


def test_validation_split_is_deterministic_and_disjoint(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n=40)
    shards = prepare_shards(str(corpus), ByteTokenizer(), tmp_path / "cache", progress=False)
    train, val = shards.split(0.1)
    assert len(val) == 4 and len(train) == 36
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(40))
    again = TokenShards(shards.directory).split(0.1)
    assert np.array_equal(again[1], val)
    assert len(shards.split(0.0)[1]) == 0
    assert len(shards.split(0.001)[1]) == 1
