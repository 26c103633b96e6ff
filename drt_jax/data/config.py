"""Configuration of the input pipeline and the error type it raises."""

from __future__ import annotations

import dataclasses

FORMATS = ("auto", "txt", "jsonl", "parquet")
MODES = ("packed", "documents")
# Marks a task example may carry besides tokens and mask (drt_jax.data.mixture): its answer tokens, the
# needle tokens the answer is copied from, and which of the mixture's tasks it came from (its 1-based
# place in data.mixture on every token; 0 for corpus windows), set by the mixture itself.
TASK_FIELDS = ("answer", "needle", "task")
# Where a NIAH question ends within its chunk: drt_jax.tasks.niah.ALIGNS (kept apart from that module,
# which registers with the mixture on import).
NIAH_ALIGNS = ("random", "chunk", "pad")


class DataError(ValueError):
    """A user-facing data problem. The message is always a single line that
    names the offending path or field and how to fix it."""

    def __init__(self, message: str):
        # Multi-line messages get buried in tracebacks; keep them greppable.
        super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Input pipeline settings.

    Attributes:
      corpus: path to a file or folder, or a built-in corpus (no download
        needed): "default" (the running Python's standard library sources,
        about 10M byte tokens) or "python-all" (every source and text file of
        the standard library and the installed packages, deduplicated, split
        by content hash; hundreds of millions of tokens where big packages
        are installed). See drt_jax.data.corpora.
      format: "auto" (by file suffix), "txt", "jsonl" or "parquet".
      text_field: JSON key / parquet column holding a document's text.
      tokenizer: "byte" or a path to a Hugging Face tokenizer.json.
      cache_dir: where token shards are written ("~" is expanded).
      seq_len: tokens per example; batches are int32 [batch_size, seq_len].
      batch_size: examples per batch on *this* host.
      mode: "packed" (documents joined by eos, fixed windows) or "documents"
        (windows inside documents of at least seq_len tokens).
      seed: shuffle and task seed, in [0, 2**32).
      val_fraction: fraction of documents held out for evaluation, in [0, 1).
      min_doc_tokens: documents with fewer tokens are skipped when sharding.
      mixture: ((task_name, weight), ...) tasks mixed with the corpus; tasks
        are looked up in drt_jax.data.mixture's registry.
      corpus_weight: mixing weight of the corpus relative to `mixture`.
      niah_align: where the NIAH tasks of `mixture` end their question: "pad"
        (the default: at a uniform offset within its chunk, then left-padded onto
        the chunk grid exactly as the inference engine aligns a prompt, see
        ModelConfig.prompt_align), "random" (at a uniform offset, unpadded) or
        "chunk" (on the chunk grid, the authors' layout and that of the results
        before issue 25). See drt_jax.tasks.niah.
      niah_distractors: keyed needles besides the queried one in the multi-key
        task and the conversation's second question (5, the authors'; fewer
        make a curriculum's first stage, where a keyed read-out has fewer
        needles to tell apart).
      num_workers: grain worker processes; 0 reads in-process.
    """

    corpus: str = "default"
    format: str = "auto"
    text_field: str = "text"
    tokenizer: str = "byte"
    cache_dir: str = "~/.cache/drt_jax/data"
    seq_len: int = 1024
    batch_size: int = 8
    mode: str = "packed"
    seed: int = 0
    val_fraction: float = 0.01
    min_doc_tokens: int = 1
    mixture: tuple[tuple[str, float], ...] = ()
    corpus_weight: float = 1.0
    niah_align: str = "pad"
    niah_distractors: int = 5
    num_workers: int = 0

    def __post_init__(self):
        # Lists from YAML/JSON configs are accepted and frozen into tuples so the
        # config stays hashable.
        object.__setattr__(self, "mixture", tuple(tuple(m) for m in self.mixture))
        checks = [
            (
                isinstance(self.corpus, str) and self.corpus != "",
                "corpus must be a non-empty path or a built-in name ('default', 'python-all')",
            ),
            (self.format in FORMATS, f"format must be one of {FORMATS}, got {self.format!r}"),
            (
                isinstance(self.text_field, str) and self.text_field != "",
                "text_field must be a non-empty string",
            ),
            (
                isinstance(self.tokenizer, str) and self.tokenizer != "",
                "tokenizer must be 'byte' or a path to tokenizer.json",
            ),
            (isinstance(self.cache_dir, str) and self.cache_dir != "", "cache_dir must be a non-empty path"),
            (
                _is_int(self.seq_len) and self.seq_len >= 2,
                f"seq_len must be an int >= 2, got {self.seq_len!r}",
            ),
            (
                _is_int(self.batch_size) and self.batch_size >= 1,
                f"batch_size must be an int >= 1, got {self.batch_size!r}",
            ),
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (
                _is_int(self.seed) and 0 <= self.seed < 2**32,
                f"seed must be an int in [0, 2**32), got {self.seed!r}",
            ),
            (
                isinstance(self.val_fraction, (int, float)) and 0.0 <= self.val_fraction < 1.0,
                f"val_fraction must be in [0, 1), got {self.val_fraction!r}",
            ),
            (
                _is_int(self.min_doc_tokens) and self.min_doc_tokens >= 1,
                f"min_doc_tokens must be an int >= 1, got {self.min_doc_tokens!r}",
            ),
            (
                isinstance(self.corpus_weight, (int, float)) and self.corpus_weight > 0,
                f"corpus_weight must be > 0, got {self.corpus_weight!r}",
            ),
            (
                self.niah_align in NIAH_ALIGNS,
                f"niah_align must be one of {NIAH_ALIGNS}, got {self.niah_align!r}",
            ),
            (
                _is_int(self.niah_distractors) and self.niah_distractors >= 0,
                f"niah_distractors must be an int >= 0, got {self.niah_distractors!r}",
            ),
            (
                _is_int(self.num_workers) and self.num_workers >= 0,
                f"num_workers must be an int >= 0, got {self.num_workers!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise DataError(f"DataConfig: {message}")
        for entry in self.mixture:
            if (
                len(entry) != 2
                or not isinstance(entry[0], str)
                or not isinstance(entry[1], (int, float))
                or entry[1] <= 0
            ):
                raise DataError(f"DataConfig: mixture entries must be (task_name, weight > 0), got {entry!r}")
        names = [name for name, _ in self.mixture]
        if len(set(names)) != len(names):
            raise DataError(f"DataConfig: mixture task names must be unique, got {names}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
