"""Reading documents from txt / jsonl / parquet files and folders."""

import json
import logging
import os
from pathlib import Path

import pytest

from drt_jax.data import DataError, default_corpus_path, iter_documents, list_source_files
from drt_jax.data.corpora import ReadStats


def read(corpus, fmt="auto", text_field="text"):
    stats = ReadStats()
    docs = list(iter_documents(list_source_files(str(corpus), fmt), text_field=text_field, stats=stats))
    return docs, stats


def test_txt_folder_recursive_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "c.txt").write_text("third")
    (tmp_path / "ignored.md").write_text("not a corpus file")
    docs, stats = read(tmp_path)
    assert docs == ["first", "second", "third"]
    assert stats.documents == 3 and stats.non_utf8 == 0


def test_jsonl_with_custom_field_and_bad_lines(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"body": "doc one"}),
        "",
        "{not json",
        json.dumps({"other": "no body"}),
        json.dumps({"body": 7}),
        json.dumps({"body": "doc two ✓"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        docs, stats = read(path, text_field="body")
    assert docs == ["doc one", "doc two ✓"]
    assert stats.bad_records == 3
    assert "line 3" in caplog.text


def test_parquet_streams_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i}" for i in range(10)]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": texts, "id": list(range(10))}), path, row_group_size=3)
    assert pq.ParquetFile(path).num_row_groups == 4
    docs, _ = read(path)
    assert docs == texts
    with pytest.raises(DataError) as e:
        read(path, text_field="body")
    assert "'body'" in str(e.value) and "\n" not in str(e.value)


def test_explicit_format_overrides_suffix(tmp_path):
    path = tmp_path / "data.log"
    path.write_text(json.dumps({"text": "x"}) + "\n")
    assert read(path, fmt="jsonl")[0] == ["x"]
    assert read(path, fmt="txt")[0] == [path.read_text()]


def test_non_utf8_is_replaced_and_counted(tmp_path, caplog):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe bytes")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with caplog.at_level(logging.WARNING):
        docs, stats = read(tmp_path)
    assert docs == ["caf\ufffd", "ok \ufffd\ufffd bytes"]
    assert stats.non_utf8 == 2
    assert "non-UTF-8" in caplog.text and "bad.txt" in caplog.text


def test_missing_corpus_is_one_line_error(tmp_path):
    with pytest.raises(DataError) as e:
        list_source_files(str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in str(e.value) and "\n" not in str(e.value)


def test_default_corpus_is_stdlib_sources():
    root = Path(default_corpus_path())
    assert (root / "os.py").is_file()
    files = list_source_files("default")
    names = {Path(f.path).relative_to(root).as_posix() for f in files}
    assert "os.py" in names and "json/decoder.py" in names
    assert not any(n.startswith(("test/", "site-packages/")) or "/tests/" in n for n in names)
    # The size decides whether token shards are current, so it must be the file's.
    assert all(f.format == "txt" and f.size == os.path.getsize(f.path) for f in files)
