"""Tokenizers: round trips, special ids, BPE training and load errors."""

import json

import pytest

from drt_jax.data import ByteTokenizer, DataError, HFTokenizer, Tokenizer, load_tokenizer
from drt_jax.data.train_bpe import SPECIAL_TOKENS
from drt_jax.data.train_bpe import main as train_bpe_main

TEXTS = [
    "hello world",
    "naïve café ☕ — 日本語",
    "",
    "line\nbreaks\tand  spaces",
    "def f(x):\n    return x + 1\n",
]


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.landmark_id) == (259, 256, 257, 258)
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([104, tok.eos_id, 105, tok.pad_id, tok.landmark_id]) == "hi"


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    corpus = d / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i}.txt").write_text(
            f"the quick brown fox {i} jumps over the lazy dog. " * 20 + TEXTS[i % 5]
        )
    out = d / "tok" / "tokenizer.json"
    train_bpe_main(["--corpus", str(corpus), "--vocab-size", "300", "--out", str(out)])
    return out


def test_train_bpe_writes_tokenizer_with_specials(bpe_path):
    vocab = json.loads(bpe_path.read_text())["model"]["vocab"]
    assert all(token in vocab for token in SPECIAL_TOKENS)
    assert 259 < len(vocab) <= 300
    # Merges were learned: a frequent word becomes fewer tokens than bytes.
    tok = load_tokenizer(str(bpe_path))
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")


def test_hf_tokenizer_round_trip_and_special_ids(bpe_path):
    tok = load_tokenizer(str(bpe_path))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    vocab = json.loads(bpe_path.read_text())["model"]["vocab"]
    assert tok.eos_id == vocab["<|endoftext|>"]
    assert tok.pad_id == vocab["<pad>"]
    assert tok.landmark_id == vocab["<landmark>"]
    assert tok.vocab_size == len(vocab)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("ab") + [tok.eos_id, tok.pad_id]) == "ab"
    # A folder holding tokenizer.json works too.
    assert load_tokenizer(str(bpe_path.parent)).fingerprint == tok.fingerprint


def test_hf_tokenizer_appends_missing_pad_and_landmark(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers

    raw = RawTokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    raw.save(str(path))
    tok = HFTokenizer(path)
    assert tok.eos_id == 2
    assert (tok.pad_id, tok.landmark_id, tok.vocab_size) == (4, 5, 6)
    assert tok.encode("a b a") == [0, 1, 0]
    assert tok.decode([0, tok.pad_id, 1, tok.landmark_id]) == "a b"


def test_missing_tokenizer_file_is_one_line_error(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(DataError) as e:
        load_tokenizer(str(missing))
    message = str(e.value)
    assert "\n" not in message
    assert str(missing) in message and "train_bpe" in message
    with pytest.raises(ValueError):
        HFTokenizer(missing)


def test_train_bpe_rejects_tiny_vocab(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("abc")
    with pytest.raises(SystemExit) as e:
        train_bpe_main(
            ["--corpus", str(tmp_path / "a.txt"), "--vocab-size", "10", "--out", str(tmp_path / "t.json")]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--vocab-size must be >= 259" in err and err.count("\n") == 1
