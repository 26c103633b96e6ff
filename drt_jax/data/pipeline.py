"""grain input pipeline over token shards.

Each batch is a dict of int32 numpy arrays:
  tokens: [batch_size, seq_len] token ids. Models predict tokens[:, 1:] from
          tokens[:, :-1]; no padding occurs in corpus windows.
  mask:   [batch_size, seq_len] 1 where the token is a loss target. All ones for
          corpus windows; tasks (see mixture.py) may zero out parts.

Element order, per epoch: a seeded global shuffle of the windows (reshuffled
every epoch), optionally mixed with tasks, then split across hosts by striding
(host h takes elements h, h + n, h + 2n, ...), then batched with
drop_remainder. The result is a pure function of (config, shard files, host),
so the iterator state is just a position and checkpoints resume exactly.
"""

from __future__ import annotations

import logging
import sys

import grain
import numpy as np

from drt_jax.data.config import DataConfig, DataError
from drt_jax.data.mixture import mix_with_tasks
from drt_jax.data.shards import TokenShards, prepare_shards
from drt_jax.data.tokenizers import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


class _MemmapSource:
    """Base of the window sources: opens the token memmap lazily and leaves it
    out of pickles, so sources travel cheaply to grain worker processes."""

    def __init__(self, shards: TokenShards):
        self._path, self._dtype, self._num_tokens = shards.tokens_path, shards.dtype, shards.num_tokens
        self._tokens = None

    def _data(self) -> np.memmap:
        if self._tokens is None:
            self._tokens = np.memmap(self._path, dtype=self._dtype, mode="r", shape=(self._num_tokens,))
        return self._tokens

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokens"] = None
        return state


class PackedWindows(_MemmapSource):
    """Documents `doc_ids` joined as d0 eos d1 eos ..., cut into consecutive
    windows of seq_len tokens; the last partial window is dropped.

    Element i: {"tokens": int32 [seq_len], "mask": int32 [seq_len]} covering
    stream positions [i * seq_len, (i + 1) * seq_len).
    """

    def __init__(self, shards: TokenShards, doc_ids: np.ndarray, seq_len: int, eos_id: int):
        super().__init__(shards)
        self.seq_len, self.eos_id = seq_len, eos_id
        self.doc_starts = shards.offsets[doc_ids]
        self.doc_lens = shards.offsets[doc_ids + 1] - self.doc_starts
        # Stream offset of each document, counting one eos after each.
        self.stream_starts = np.concatenate([[0], np.cumsum(self.doc_lens + 1)])
        self._len = int(self.stream_starts[-1] // seq_len)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        data, L = self._data(), self.seq_len
        start = int(index) * L
        out = np.empty(L, dtype=np.int32)
        k = int(np.searchsorted(self.stream_starts, start, side="right")) - 1
        pos = start - int(self.stream_starts[k])
        filled = 0
        while filled < L:
            length = int(self.doc_lens[k])
            if pos < length:
                take = min(length - pos, L - filled)
                begin = int(self.doc_starts[k]) + pos
                out[filled : filled + take] = data[begin : begin + take]
                filled += take
                pos += take
            if filled < L:
                out[filled] = self.eos_id
                filled += 1
                k, pos = k + 1, 0
        return {"tokens": out, "mask": np.ones(L, dtype=np.int32)}


class DocumentWindows(_MemmapSource):
    """Non-overlapping windows of seq_len tokens inside each document of at
    least seq_len tokens; shorter documents are skipped (and counted).

    Element i: {"tokens": int32 [seq_len], "mask": int32 [seq_len]}.
    """

    def __init__(self, shards: TokenShards, doc_ids: np.ndarray, seq_len: int):
        super().__init__(shards)
        self.seq_len = seq_len
        starts = shards.offsets[doc_ids]
        lens = shards.offsets[doc_ids + 1] - starts
        keep = lens >= seq_len
        self.num_skipped = int((~keep).sum())
        self.doc_starts = starts[keep]
        self.window_starts = np.concatenate([[0], np.cumsum(lens[keep] // seq_len)])

    def __len__(self) -> int:
        return int(self.window_starts[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        k = int(np.searchsorted(self.window_starts, index, side="right")) - 1
        begin = int(self.doc_starts[k]) + (int(index) - int(self.window_starts[k])) * self.seq_len
        tokens = np.asarray(self._data()[begin : begin + self.seq_len], dtype=np.int32)
        return {"tokens": tokens, "mask": np.ones(self.seq_len, dtype=np.int32)}


def _host_split(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not (shard_count >= 1 and 0 <= shard_index < shard_count):
        raise DataError(
            f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, shard_count={shard_count}"
        )
    return shard_index, shard_count


def make_dataset(
    cfg: DataConfig,
    tokenizer: Tokenizer | None = None,
    *,
    split: str = "train",
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    progress: bool = True,
) -> grain.MapDataset:
    """This host's batches as a random-access grain MapDataset.

    Args:
      split: "train" (mixes in cfg.mixture) or "val" (corpus only).
      shard_index, shard_count: this host's share; default jax.process_index()
        and jax.process_count().
      num_epochs: None repeats forever (len is then sys.maxsize // batch_size).
      shuffle: seeded global shuffle by cfg.seed, different in every epoch.

    Returns:
      MapDataset whose elements are {"tokens", "mask"}: int32 [batch_size, seq_len].

    Raises:
      DataError: bad split or host arguments, empty split, or a split with
        fewer windows than one global batch (batch_size * shard_count).
    """
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    shard_index, shard_count = _host_split(shard_index, shard_count)
    tokenizer = load_tokenizer(cfg.tokenizer) if tokenizer is None else tokenizer
    shards = prepare_shards(
        cfg.corpus,
        tokenizer,
        cfg.cache_dir,
        fmt=cfg.format,
        text_field=cfg.text_field,
        min_doc_tokens=cfg.min_doc_tokens,
        progress=progress,
    )
    train_ids, val_ids = shards.split(cfg.val_fraction)
    doc_ids = train_ids if split == "train" else val_ids
    if len(doc_ids) == 0:
        raise DataError(
            f"the {split} split of corpus {cfg.corpus!r} is empty ({shards.num_docs} documents, "
            f"val_fraction={cfg.val_fraction}); set val_fraction > 0 or add documents"
        )
    if cfg.mode == "packed":
        source = PackedWindows(shards, doc_ids, cfg.seq_len, tokenizer.eos_id)
    else:
        source = DocumentWindows(shards, doc_ids, cfg.seq_len)
        if source.num_skipped:
            logger.warning(
                "documents mode: skipped %d of %d %s documents shorter than seq_len=%d",
                source.num_skipped,
                len(doc_ids),
                split,
                cfg.seq_len,
            )
    needed = cfg.batch_size * shard_count
    if len(source) < needed:
        raise DataError(
            f"corpus {cfg.corpus!r} ({split} split, mode={cfg.mode}) yields {len(source)} windows of "
            f"seq_len={cfg.seq_len} but one batch needs {needed} (batch_size={cfg.batch_size} x "
            f"{shard_count} hosts); use a larger corpus or a smaller seq_len/batch_size"
        )
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.seed(cfg.seed).shuffle()
    ds = ds.repeat(num_epochs)
    if split == "train":
        ds = mix_with_tasks(ds, cfg.mixture, cfg.corpus_weight, cfg.seq_len, tokenizer, cfg.seed)
    if len(ds) < sys.maxsize:
        # Equal shares keep hosts in lockstep at the end of a finite run.
        ds = ds[: len(ds) // shard_count * shard_count]
    ds = ds[shard_index::shard_count]
    return ds.batch(cfg.batch_size, drop_remainder=True)


def _to_iterator(ds: grain.MapDataset, cfg: DataConfig, prefetch: int):
    # Elements are whole batches, so a small buffer is enough; grain's default
    # (500) would hold hundreds of long-context batches in memory.
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, min(prefetch, 8)), prefetch_buffer_size=prefetch)
    )
    if cfg.num_workers > 0:
        from absl import flags

        # grain's workers read absl flags, which are unparsed outside absl.app.run.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return iter(it_ds)


def build_train_iterator(
    cfg: DataConfig,
    tokenizer: Tokenizer | None = None,
    *,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    prefetch: int = 4,
    progress: bool = True,
) -> grain.DatasetIterator:
    """Shuffled, repeated, host-sharded training batches (see `make_dataset`).

    The iterator supports get_state()/set_state() and can be checkpointed with
    orbax via grain.checkpoint.CheckpointSave / CheckpointRestore.
    """
    ds = make_dataset(
        cfg,
        tokenizer,
        split="train",
        shard_index=shard_index,
        shard_count=shard_count,
        num_epochs=num_epochs,
        shuffle=True,
        progress=progress,
    )
    return _to_iterator(ds, cfg, prefetch)


def build_eval_iterator(
    cfg: DataConfig,
    tokenizer: Tokenizer | None = None,
    *,
    shard_index: int | None = None,
    shard_count: int | None = None,
    prefetch: int = 4,
    progress: bool = True,
) -> grain.DatasetIterator:
    """One ordered pass over this host's share of the validation split (no
    tasks); ends after the last full batch."""
    ds = make_dataset(
        cfg,
        tokenizer,
        split="val",
        shard_index=shard_index,
        shard_count=shard_count,
        num_epochs=1,
        shuffle=False,
        progress=progress,
    )
    return _to_iterator(ds, cfg, prefetch)
