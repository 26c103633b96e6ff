"""Train a byte-level BPE tokenizer on a corpus.

    python -m drt_jax.data.train_bpe --corpus PATH --vocab-size N --out tokenizer.json

The special tokens <|endoftext|>, <pad> and <landmark> get the first ids, so
HFTokenizer finds all three in the vocabulary and appends nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable, Sequence

from drt_jax.data.config import DataError
from drt_jax.data.corpora import iter_documents, list_source_files

SPECIAL_TOKENS = ("<|endoftext|>", "<pad>", "<landmark>")
_BYTE_ALPHABET_SIZE = 256


def train_bpe(
    documents: Iterable[str],
    vocab_size: int,
    out: str | os.PathLike,
    *,
    min_frequency: int = 2,
) -> str:
    """Trains byte-level BPE on `documents` and writes tokenizer.json to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise DataError(
            f"--vocab-size must be >= {minimum} (256 bytes + {len(SPECIAL_TOKENS)} specials), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    out = os.fspath(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tok.save(out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", required=True, help="file, folder, or a built-in corpus: 'default' (Python stdlib sources) or 'python-all'")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="output tokenizer.json path")
    parser.add_argument("--format", default="auto", choices=("auto", "txt", "jsonl", "parquet"))
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--min-frequency", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        files = list_source_files(args.corpus, args.format)
        docs = iter_documents(files, text_field=args.text_field)
        path = train_bpe(docs, args.vocab_size, args.out, min_frequency=args.min_frequency)
    except DataError as e:
        parser.exit(2, f"error: {e}\n")
    print(path)


if __name__ == "__main__":
    main()
