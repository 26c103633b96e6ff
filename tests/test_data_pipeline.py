"""grain pipeline: shapes, modes, determinism, host split, checkpoints, mixtures."""

import dataclasses

import grain
import numpy as np
import pytest

from drt_jax.data import (
    ByteTokenizer,
    DataConfig,
    DataError,
    build_eval_iterator,
    build_train_iterator,
    make_dataset,
    prepare_shards,
    register_task,
)
from drt_jax.data.mixture import CopyTask

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(30):
        words = rng.choice(["alpha", "beta", "gamma", "delta", "eps"], size=int(rng.integers(5, 80)))
        (root / f"doc{i:02d}.txt").write_text(f"<{i}> " + " ".join(words))
    return root


@pytest.fixture
def cfg(corpus, tmp_path_factory):
    return DataConfig(
        corpus=str(corpus),
        cache_dir=str(tmp_path_factory.getbasetemp() / "cache"),
        seq_len=16,
        batch_size=4,
        seed=1,
        val_fraction=0.2,
    )


def take(it, n):
    return [next(it) for _ in range(n)]


def rows(batches):
    return [tuple(r) for b in batches for r in b["tokens"].tolist()]


def test_batch_shapes_and_dtypes(cfg):
    batch = next(build_train_iterator(cfg, TOK, shard_index=0, shard_count=1, progress=False))
    assert set(batch) == {"tokens", "mask"}
    assert batch["tokens"].shape == (4, 16) and batch["tokens"].dtype == np.int32
    assert batch["mask"].shape == (4, 16) and batch["mask"].dtype == np.int32
    assert (batch["mask"] == 1).all()


def test_packed_windows_are_the_eos_joined_stream(cfg):
    shards = prepare_shards(cfg.corpus, TOK, cfg.cache_dir, progress=False)
    train_ids, _ = shards.split(cfg.val_fraction)
    stream = np.concatenate([np.append(shards.document(d), TOK.eos_id) for d in train_ids])
    ds = make_dataset(cfg, TOK, shard_index=0, shard_count=1, num_epochs=1, shuffle=False, progress=False)
    flat = np.concatenate([b["tokens"].reshape(-1) for b in ds])
    assert len(flat) == len(stream) // 16 // 4 * 4 * 16
    assert np.array_equal(flat, stream[: len(flat)])


def test_documents_mode_windows_stay_inside_documents(cfg, caplog):
    cfg = dataclasses.replace(cfg, mode="documents", seq_len=64, batch_size=2)
    shards = prepare_shards(cfg.corpus, TOK, cfg.cache_dir, progress=False)
    train_ids, _ = shards.split(cfg.val_fraction)
    docs = [shards.document(d) for d in train_ids]
    expected = [tuple(d[k * 64 : (k + 1) * 64]) for d in docs for k in range(len(d) // 64)]
    short = sum(len(d) < 64 for d in docs)
    assert short > 0
    with caplog.at_level("WARNING"):
        ds = make_dataset(cfg, TOK, shard_index=0, shard_count=1, num_epochs=1, shuffle=False, progress=False)
    assert f"skipped {short} of {len(docs)} train documents" in caplog.text
    got = rows(list(ds))
    assert got == expected[: len(got)] and len(got) == len(expected) // 2 * 2
    assert TOK.eos_id not in np.array(got)


def test_same_seed_same_batches_other_seed_other_batches(cfg):
    a = rows(take(build_train_iterator(cfg, TOK, shard_index=0, shard_count=1, progress=False), 5))
    b = rows(take(build_train_iterator(cfg, TOK, shard_index=0, shard_count=1, progress=False), 5))
    c = rows(
        take(
            build_train_iterator(
                dataclasses.replace(cfg, seed=2), TOK, shard_index=0, shard_count=1, progress=False
            ),
            5,
        )
    )
    assert a == b
    assert a != c


def test_epochs_reshuffle_and_cover_all_windows(cfg):
    ds = make_dataset(cfg, TOK, shard_index=0, shard_count=1, num_epochs=2, progress=False)
    per_epoch = len(ds) // 2
    epoch1, epoch2 = rows(list(ds)[:per_epoch]), rows(list(ds)[per_epoch:])
    assert epoch1 != epoch2
    ordered = rows(
        list(
            make_dataset(cfg, TOK, shard_index=0, shard_count=1, num_epochs=1, shuffle=False, progress=False)
        )
    )
    assert len(set(epoch1)) > 0.9 * len(set(ordered))


def test_host_shards_are_disjoint_and_cover_global_batches(cfg):
    single = make_dataset(
        dataclasses.replace(cfg, batch_size=8), TOK, shard_index=0, shard_count=1, progress=False
    )
    host0 = make_dataset(cfg, TOK, shard_index=0, shard_count=2, progress=False)
    host1 = make_dataset(cfg, TOK, shard_index=1, shard_count=2, progress=False)
    for step in range(6):
        h0, h1 = host0[step]["tokens"], host1[step]["tokens"]
        assert not {tuple(r) for r in h0} & {tuple(r) for r in h1}
        assert sorted(map(tuple, np.concatenate([h0, h1]))) == sorted(map(tuple, single[step]["tokens"]))


def test_iterator_state_round_trips_through_orbax(cfg, tmp_path):
    import orbax.checkpoint as ocp

    it = build_train_iterator(cfg, TOK, shard_index=0, shard_count=1, progress=False)
    take(it, 3)
    mgr = ocp.CheckpointManager(tmp_path / "ckpt")
    mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    expected = take(it, 3)

    fresh = build_train_iterator(cfg, TOK, shard_index=0, shard_count=1, progress=False)
    assert rows(take(fresh, 1)) != rows(expected[:1])
    mgr.restore(mgr.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    mgr.close()
    got = take(fresh, 3)
    for g, e in zip(got, expected, strict=True):
        assert np.array_equal(g["tokens"], e["tokens"]) and np.array_equal(g["mask"], e["mask"])


def test_get_state_set_state(cfg):
    it = build_train_iterator(cfg, TOK, shard_index=0, shard_count=1, progress=False)
    take(it, 2)
    state = it.get_state()
    expected = rows(take(it, 2))
    other = build_train_iterator(cfg, TOK, shard_index=0, shard_count=1, progress=False)
    other.set_state(state)
    assert rows(take(other, 2)) == expected


def assert_one_line(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_corpus_smaller_than_one_batch_is_one_line_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tiny.txt").write_text("x" * 50)
    cfg = DataConfig(
        corpus=str(tmp_path / "c"),
        cache_dir=str(tmp_path / "cache"),
        seq_len=16,
        batch_size=4,
        val_fraction=0,
    )
    with pytest.raises(DataError) as e:
        build_train_iterator(cfg, TOK, shard_index=0, shard_count=1, progress=False)
    assert_one_line(e, str(tmp_path / "c"), "yields 3 windows", "needs 4")


def test_eval_iterator_is_one_ordered_pass_over_val(cfg):
    batches = list(build_eval_iterator(cfg, TOK, shard_index=0, shard_count=1, progress=False))
    again = list(build_eval_iterator(cfg, TOK, shard_index=0, shard_count=1, progress=False))
    assert len(batches) >= 1 and rows(batches) == rows(again)
    shards = prepare_shards(cfg.corpus, TOK, cfg.cache_dir, progress=False)
    _, val_ids = shards.split(cfg.val_fraction)
    stream = np.concatenate([np.append(shards.document(d), TOK.eos_id) for d in val_ids])
    flat = np.concatenate([b["tokens"].reshape(-1) for b in batches])
    assert len(flat) == len(stream) // 64 * 64
    assert np.array_equal(flat, stream[: len(flat)])
    with pytest.raises(DataError) as e:
        build_eval_iterator(
            dataclasses.replace(cfg, val_fraction=0.0), TOK, shard_index=0, shard_count=1, progress=False
        )
    assert_one_line(e, "val split", "val_fraction")


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("seq_len", 1, "seq_len"),
        ("mode", "chunks", "mode"),
        ("format", "csv", "format"),
        ("val_fraction", 1.0, "val_fraction"),
        ("mixture", (("copy", 0),), "mixture"),
        ("num_workers", -1, "num_workers"),
        ("seed", -1, "seed"),
    ],
)
def test_config_validation_is_one_line(field, value, fragment):
    with pytest.raises(DataError) as e:
        DataConfig(**{field: value})
    assert_one_line(e, fragment)


def test_copy_task_examples():
    task = CopyTask(seq_len=16, tokenizer=TOK, seed=3)
    for i in range(20):
        ex = task[i]
        tokens, mask = ex["tokens"], ex["mask"]
        k = int(mask.sum())
        assert tokens.shape == mask.shape == (16,)
        assert 1 <= k <= 7
        assert tokens[k] == TOK.eos_id
        assert np.array_equal(tokens[:k], tokens[k + 1 : 2 * k + 1])
        assert (tokens[:k] < 256).all() and (tokens[2 * k + 1 :] == TOK.pad_id).all()
        assert np.array_equal(mask[k + 1 : 2 * k + 1], np.ones(k))
    assert np.array_equal(task[5]["tokens"], CopyTask(16, TOK, 3)[5]["tokens"])


def test_mixture_hook_mixes_registered_tasks_by_weight(cfg):
    class Constant:
        def __init__(self, seq_len, value):
            self.seq_len, self.value = seq_len, value

        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"tokens": np.full(self.seq_len, self.value)}

    register_task("test_constant", lambda seq_len, tok, seed: Constant(seq_len, 300), overwrite=True)
    mixed = dataclasses.replace(cfg, mixture=(("copy", 1.0), ("test_constant", 2.0)), corpus_weight=1.0)
    batches = take(build_train_iterator(mixed, TOK, shard_index=0, shard_count=1, progress=False), 20)
    tokens = np.concatenate([b["tokens"] for b in batches])
    masks = np.concatenate([b["mask"] for b in batches])
    constant = (tokens == 300).all(axis=1)
    copy = (tokens == TOK.pad_id).any(axis=1)
    assert abs(constant.mean() - 0.5) < 0.1 and abs(copy.mean() - 0.25) < 0.1
    assert (masks[constant] == 1).all() and (masks[copy].sum(1) < 16).all()
    # Each row carries its task's 1-based place in the mixture on every token, 0 for corpus windows.
    task = np.concatenate([b["task"] for b in batches])
    assert (task == task[:, :1]).all()
    assert (task[copy, 0] == 1).all() and (task[constant, 0] == 2).all() and (task[~copy & ~constant] == 0).all()
    assert set(batches[0]) == {"tokens", "mask", "answer", "needle", "task"}

    again = take(build_train_iterator(mixed, TOK, shard_index=0, shard_count=1, progress=False), 20)
    assert rows(again) == rows(batches)

    with pytest.raises(DataError) as e:
        build_train_iterator(
            dataclasses.replace(cfg, mixture=(("nope", 1.0),)),
            TOK,
            shard_index=0,
            shard_count=1,
            progress=False,
        )
    assert_one_line(e, "unknown task 'nope'", "copy")

    register_task("test_bad", lambda seq_len, tok, seed: Constant(seq_len + 1, 1), overwrite=True)
    with pytest.raises(DataError) as e:
        build_train_iterator(
            dataclasses.replace(cfg, mixture=(("test_bad", 1.0),)),
            TOK,
            shard_index=0,
            shard_count=1,
            progress=False,
        )
    assert_one_line(e, "test_bad", "(17,)")


def test_worker_processes_match_in_process_and_checkpoint(cfg, tmp_path):
    import orbax.checkpoint as ocp

    mixed = dataclasses.replace(cfg, mixture=(("copy", 0.5),))
    expected = take(build_train_iterator(mixed, TOK, shard_index=0, shard_count=1, progress=False), 6)
    workers = dataclasses.replace(mixed, num_workers=1)
    it = build_train_iterator(workers, TOK, shard_index=0, shard_count=1, progress=False)
    try:
        assert rows(take(it, 3)) == rows(expected[:3])
        mgr = ocp.CheckpointManager(tmp_path / "ckpt")
        mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
    finally:
        it.close()
    fresh = build_train_iterator(workers, TOK, shard_index=0, shard_count=1, progress=False)
    try:
        mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
        mgr.close()
        assert rows(take(fresh, 3)) == rows(expected[3:])
    finally:
        fresh.close()
