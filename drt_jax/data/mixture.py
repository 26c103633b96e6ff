"""Task mixtures: synthetic tasks mixed into the corpus stream by weight.

A task is registered under a name with a factory

    factory(seq_len: int, tokenizer: Tokenizer, seed: int) -> grain.MapDataset

(or any random-access source with __len__/__getitem__) whose elements are
{"tokens": int32 [seq_len]} and optionally {"mask": int32 [seq_len]}, where
mask[t] = 1 marks token t as a loss target. Without a mask every non-pad
token is a target. Retrieval tasks may also mark "answer" (the tokens whose
loss is the task's answer loss) and "needle" (the tokens the answer is copied
from; the trainer reports whether their chunks were retrieved), int32
[seq_len] each; both default to zeros, and corpus windows get zeros. The
mixture adds "task": the task's 1-based place in the mixture on every token
(0 in corpus windows), so that the trainer reports each task's answer loss
and recall apart. Every element of a mixture has the same five fields.
Elements must be a pure function of (seed, index) so that runs are
reproducible and iterator checkpoints resume exactly.

A needle-in-a-haystack generator plugs in the same way:

    register_task("niah", make_niah_dataset)
    DataConfig(..., mixture=(("niah", 0.1),))
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable, Sequence

import grain
import numpy as np

from drt_jax.data.config import TASK_FIELDS, DataError
from drt_jax.data.tokenizers import Tokenizer

TaskFactory = Callable[[int, Tokenizer, int], "grain.MapDataset"]

_REGISTRY: dict[str, TaskFactory] = {}


def register_task(name: str, factory: TaskFactory, *, overwrite: bool = False) -> None:
    """Makes `name` usable in DataConfig.mixture."""
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
        raise DataError(f"task {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def registered_tasks() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def task_seed(seed: int, name: str) -> int:
    """Per-task seed, so tasks mixed in one run draw independent streams."""
    return (seed + zlib.crc32(name.encode())) % 2**32


def build_task_dataset(name: str, seq_len: int, tokenizer: Tokenizer, seed: int) -> grain.MapDataset:
    """The task's examples as {"tokens", "mask"}: int32 [seq_len] each, repeated
    without end so the mixture never runs dry."""
    if name not in _REGISTRY:
        raise DataError(f"unknown task {name!r} in mixture; registered tasks: {list(registered_tasks())}")
    ds = _REGISTRY[name](seq_len, tokenizer, task_seed(seed, name))
    if not isinstance(ds, grain.MapDataset):
        ds = grain.MapDataset.source(ds)
    if len(ds) == 0:
        raise DataError(f"task {name!r} produced an empty dataset")
    ds = ds.map(_Normalize(name, seq_len, tokenizer.pad_id))
    # Fail at build time rather than deep inside a prefetch thread.
    ds[0]
    if len(ds) < sys.maxsize:
        ds = ds.repeat(None)
    return ds


def mix_with_tasks(
    corpus: grain.MapDataset,
    mixture: Sequence[tuple[str, float]],
    corpus_weight: float,
    seq_len: int,
    tokenizer: Tokenizer,
    seed: int,
) -> grain.MapDataset:
    """Interleaves `corpus` with the mixture's tasks, deterministically, in
    proportion to the weights (grain's MapDataset.mix)."""
    if not mixture:
        return corpus
    parts = [corpus.map(with_task_fields)] + [build_task_dataset(name, seq_len, tokenizer, seed).map(_TaskId(i + 1))
                                              for i, (name, _) in enumerate(mixture)]
    weights = [corpus_weight] + [w for _, w in mixture]
    return grain.MapDataset.mix(parts, weights)


class _Normalize:
    """Casts a task element to {"tokens", "mask"} int32 [seq_len] and checks it."""

    def __init__(self, name: str, seq_len: int, pad_id: int):
        self.name, self.seq_len, self.pad_id = name, seq_len, pad_id

    def __call__(self, element):
        if not isinstance(element, dict) or "tokens" not in element:
            raise DataError(
                f"task {self.name!r} must yield dicts with a 'tokens' array, got {type(element).__name__}"
            )
        tokens = np.asarray(element["tokens"], dtype=np.int32)
        if tokens.shape != (self.seq_len,):
            raise DataError(
                f"task {self.name!r} yielded tokens of shape {tokens.shape}, expected ({self.seq_len},)"
            )
        mask = element.get("mask")
        mask = (tokens != self.pad_id) if mask is None else np.asarray(mask)
        return with_task_fields({**element, "tokens": tokens, "mask": mask.astype(np.int32)})


class _TaskId:
    """Marks an element as coming from the mixture's task number `task` (1-based)."""

    def __init__(self, task: int):
        self.task = task

    def __call__(self, element):
        return {**element, "task": np.full_like(element["tokens"], self.task, np.int32)}


def with_task_fields(element: dict) -> dict:
    """{"tokens", "mask"[, "answer", "needle", "task"]} -> all five, int32 [seq_len], zeros where absent."""
    out = {"tokens": element["tokens"], "mask": element["mask"]}
    for name in TASK_FIELDS:
        value = element.get(name)
        out[name] = np.zeros_like(element["tokens"], np.int32) if value is None else np.asarray(value, np.int32)
    return out


class CopyTask:
    """Random access source of copy examples, int32 [seq_len] each.

    Example i: a random span s of k non-special tokens, then eos, then s again,
    then pad. Only the second copy is a loss target (mask 1): the first span is
    unpredictable noise.
    """

    def __init__(self, seq_len: int, tokenizer: Tokenizer, seed: int, num_examples: int = 2**30):
        if seq_len < 3:
            raise DataError(f"copy task needs seq_len >= 3, got {seq_len}")
        self.seq_len, self.seed, self.num_examples = seq_len, seed, num_examples
        self.pad_id, self.eos_id = tokenizer.pad_id, tokenizer.eos_id
        specials = {tokenizer.pad_id, tokenizer.eos_id, tokenizer.landmark_id}
        self.alphabet = np.array(
            [i for i in range(tokenizer.vocab_size) if i not in specials], dtype=np.int32
        )

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(index)])
        k = int(rng.integers(1, (self.seq_len - 1) // 2 + 1))
        span = self.alphabet[rng.integers(0, len(self.alphabet), size=k)]
        tokens = np.full(self.seq_len, self.pad_id, dtype=np.int32)
        mask = np.zeros(self.seq_len, dtype=np.int32)
        tokens[:k] = span
        tokens[k] = self.eos_id
        tokens[k + 1 : 2 * k + 1] = span
        mask[k + 1 : 2 * k + 1] = 1
        return {"tokens": tokens, "mask": mask, "answer": mask.copy()}


def copy_task(seq_len: int, tokenizer: Tokenizer, seed: int) -> grain.MapDataset:
    """Factory of the built-in "copy" task."""
    return grain.MapDataset.source(CopyTask(seq_len, tokenizer, seed))


register_task("copy", copy_task)
