"""NIAH tasks: layout on the model's chunks (the question's end at a recorded offset), determinism,
fine-tuning examples, scoring, offset buckets, the layout option in configs."""

import numpy as np
import pytest

from drt_jax.data import ByteTokenizer
from drt_jax.tasks.niah import (
    ALIGNS,
    KINDS,
    NiahSource,
    NiahTask,
    TaskError,
    make_niah_factory,
    offset_bucket,
    offset_buckets,
    score_exact,
)

TOK = ByteTokenizer()
HAY = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 100, np.uint8).astype(np.int32)


@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("S", [15, 63])
def test_layout_and_alignment(kind, S, align):
    task = NiahTask(kind, TOK, HAY, S, seed=3, align=align)
    T = 40 * S + 13  # not a multiple of S: rounded down to whole chunks
    for depth in (0.0, 0.5, 1.0):
        s = task.sample(T, depth, 1)
        assert s.tokens.shape == (T,) and s.tokens.dtype == np.int32
        # The question's last token sits at its offset in the last whole chunk (the first slot when
        # aligned); 13 spare tokens hold every answer (2hop's 12), so it never moves a chunk earlier.
        # "pad": the aligned layout, its first (S - offset) % S tokens pad ids, so that the prompt
        # without them ends at the offset.
        assert s.prompt_len - 1 == (T // S) * S - S + (0 if align == "pad" else s.offset)
        assert s.offset == 0 if align == "chunk" else 0 <= s.offset < S
        assert s.lead == ((S - s.offset) % S if align == "pad" else 0)
        assert (s.prompt_len - s.lead - 1) % S == s.offset
        assert np.all(s.tokens[: s.lead] == TOK.pad_id) and TOK.pad_id not in s.tokens[s.lead : s.prompt_len]
        assert task.prompt_len(T, depth, 1) == s.prompt_len
        np.testing.assert_array_equal(s.tokens[s.prompt_len : s.prompt_len + len(s.answer)], s.answer)
        text = bytes([0] * s.lead + s.tokens[s.lead : s.prompt_len].tolist())  # pad ids are not bytes
        q = {"single": b"|What is the passkey? The passkey is:", "multi": b"|The special magic number for ",
             "2hop": b"|The path from "}[kind]
        assert q in text[-60:]
        # The queried needle sits at `depth` of the room and at least 2 chunks before the question.
        first = s.needle_positions[0]
        assert first < s.prompt_len - len(q) - 2 * S
        if depth == 0.0:
            assert first == s.lead
        needle = {"single": b"|The passkey is:", "multi": b"|One of the special magic", "2hop": b"|DEF "}[kind]
        assert text[first : first + len(needle)] == needle
        # The answer's value appears in the prompt only inside needles: once, or twice for 2hop, where
        # the first hop's value also opens the second hop's needle.
        value = bytes(s.answer[:5].tolist())
        found = [i for i in range(len(text)) if text.startswith(value, i)]
        assert s.key_positions[0] in found and len(found) == {"single": 1, "multi": 1, "2hop": 2}[kind], found
    # Deterministic per (seed, length, depth, index); different indices differ.
    a, b, c = task.sample(T, 0.5, 2), task.sample(T, 0.5, 2), task.sample(T, 0.5, 3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.answer, c.answer)


def test_two_hop_answer_is_both_hops():
    s = NiahTask("2hop", TOK, HAY, 15, alphabet="digits").sample(900, 0.3, 0)
    text = bytes(s.tokens[: s.prompt_len].tolist())
    ans = bytes(s.answer.tolist())
    v1, v2 = ans.split(b"->")
    v0 = bytes(s.tokens[s.prompt_len - 7 : s.prompt_len - 2].tolist())
    assert b"|DEF " + v0 + b"->" + v1 + b"|" in text and b"|DEF " + v1 + b"->" + v2 + b"|" in text
    np.testing.assert_array_equal(s.tokens[list(s.key_positions)], np.frombuffer(v1 + v2, np.uint8))


@pytest.mark.parametrize("kind", KINDS)
def test_question_ends_as_the_needle_does_before_the_value(kind):
    """Copying what follows the question's last tokens in the needle must give the answer's first token:
    the authors' "...The passkey is" against the needle's "The passkey is:" P made the natural copy ':'."""
    s = NiahTask(kind, TOK, HAY, 15, seed=1).sample(900, 0.5, 4)
    key0 = s.key_positions[0]
    assert s.tokens[key0] == s.answer[0]
    np.testing.assert_array_equal(s.tokens[key0 - 3 : key0], s.tokens[s.prompt_len - 3 : s.prompt_len])


@pytest.mark.parametrize("kind", KINDS)
def test_key_positions_and_example_masks(kind):
    S = 15
    s = NiahTask(kind, TOK, HAY, S, seed=2).sample(600, 0.25, 1)
    n = len(s.answer) if kind != "2hop" else 5
    np.testing.assert_array_equal(s.tokens[list(s.key_positions[:n])], s.answer[:n])
    # Every key chunk is retrievable by the answer's chunk: at least 2 chunks before the question's end.
    assert s.needle_chunks(S).max() <= (s.prompt_len - 1) // S - 2
    ex = s.example(TOK.pad_id)
    assert ex["answer"].sum() == len(s.answer) and ex["answer"][s.prompt_len] == 1
    np.testing.assert_array_equal(np.flatnonzero(ex["needle"]), sorted(s.key_positions))


@pytest.mark.parametrize("align", ALIGNS)
def test_distractor_positions_are_the_other_needles_values(align):
    """multi: the 5 other keys' values, each right after " is " in its own "magic number" needle (the
    queried value is not among them); 2hop: v4 and v5 of the distractor chain, each after "->"; single:
    none. Chunk ids shift by the pads as the needle chunks do."""
    S = 15
    for kind, n_other, sep in (("multi", 5, b" is "), ("2hop", 2, b"->"), ("single", 0, None)):
        s = NiahTask(kind, TOK, HAY, S, seed=4, align=align).sample(1200, 0.4, 2)
        assert len(s.distractor_positions) == n_other
        chunks, values = s.distractors(S, pads=7)
        assert len(values) == n_other and chunks.tolist() == sorted({(p + 7) // S for ps in s.distractor_positions for p in ps})
        keys = set(s.key_positions)
        for ps, v in zip(s.distractor_positions, values, strict=True):
            assert len(ps) == 5 and not keys & set(ps) and list(ps) == list(range(ps[0], ps[0] + 5))
            np.testing.assert_array_equal(v, s.tokens[list(ps)])
            assert bytes(s.tokens[ps[0] - len(sep) : ps[0]].tolist()) == sep
            assert not np.array_equal(v, s.answer[:5])
            if kind == "multi":
                head = b"|One of the special magic numbers for "
                assert bytes(s.tokens[ps[0] - len(sep) - 5 - len(head) : ps[0] - len(sep) - 5].tolist()) == head


def test_too_short_and_examples():
    task = NiahTask("multi", TOK, HAY, 15)
    with pytest.raises(TaskError, match="too short"):
        task.sample(100, 0.5, 0)
    src = make_niah_factory("single", chunk_size=15, haystack=HAY)(512, TOK, 0)
    assert isinstance(src, NiahSource) and len(src) > 1000
    ex = src[5]
    assert all(ex[k].shape == (512,) for k in ("tokens", "mask", "answer", "needle"))
    end = int(ex["mask"].sum())
    assert (ex["tokens"][end:] == TOK.pad_id).all() and ex["mask"][:end].all()
    np.testing.assert_array_equal(src[5]["tokens"], ex["tokens"])


def test_registered_with_mixture():
    import drt_jax.tasks.niah  # noqa: F401  (registers on import)
    from drt_jax.data.mixture import registered_tasks

    assert {"niah_single", "niah_multi", "niah_2hop"} <= set(registered_tasks())


def test_exact_match_scores_whole_answer():
    assert score_exact([1, 2, 3, 9], [1, 2, 3])
    assert not score_exact([1, 2, 4], [1, 2, 3])  # first token right is not enough
    assert not score_exact([1, 2], [1, 2, 3])


def test_byte_level_passkeys_are_text():
    """Uniform bytes would put never-seen ids (128-255) in the answer; byte-level tasks draw alphanumerics."""
    allowed = set(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    task = NiahTask("single", TOK, HAY, 15, seed=0)
    answers = np.concatenate([task.sample(300, 0.5, i).answer for i in range(50)])
    assert set(answers.tolist()) <= allowed and len(set(answers.tolist())) > 40


# crc32 of the samples of the code before the layout option (commit d94f1a4), by (kind, S, T): the aligned
# layout must keep them, so that the results made with it stay reproducible.
_BEFORE_OFFSETS = {("single", 15, 607): 3554072231, ("single", 63, 4096): 361394545,
                   ("multi", 15, 607): 3661533390, ("multi", 63, 4096): 1759786427,
                   ("2hop", 15, 607): 3232492341, ("2hop", 63, 4096): 434811341}


def _digest(task, T, offset=None, example=True) -> int:
    import zlib

    h = 0
    for depth, index in ((0.0, 0), (0.5, 1), (1.0, 2), (0.3, 7)):
        s = task.sample(T, depth, index, offset=offset)
        fields = np.asarray([s.prompt_len, *s.key_positions, *s.needle_positions], np.int64)
        h = zlib.crc32(s.tokens.tobytes() + fields.tobytes(), h)
    if example:
        ex = task.example(T, 5)
        h = zlib.crc32(b"".join(ex[k].tobytes() for k in ("tokens", "mask", "answer", "needle")), h)
    return h


@pytest.mark.parametrize("kind, S, T", sorted(_BEFORE_OFFSETS))
def test_aligned_layout_is_the_layout_before_offsets(kind, S, T):
    want = _BEFORE_OFFSETS[(kind, S, T)]
    assert _digest(NiahTask(kind, TOK, HAY, S, seed=3, align="chunk"), T) == want
    # Offset 0 of the random layout is the same layout: the offset is drawn apart from the sample's rest,
    # so a sample that drew 0 is the aligned one too.
    random, aligned = NiahTask(kind, TOK, HAY, S, seed=3), NiahTask(kind, TOK, HAY, S, seed=3, align="chunk")
    assert _digest(random, T, offset=0, example=False) == _digest(aligned, T, example=False)
    drew_zero = next(i for i in range(10 * S) if random.sample(T, 0.5, i).offset == 0)
    np.testing.assert_array_equal(random.sample(T, 0.5, drew_zero).tokens, aligned.sample(T, 0.5, drew_zero).tokens)


@pytest.mark.parametrize("kind", KINDS)
def test_random_offsets_cover_the_chunk_and_land_where_recorded(kind):
    S, T = 15, 40 * 15  # a whole number of chunks: large offsets must move the question a chunk earlier
    task = NiahTask(kind, TOK, HAY, S, seed=5)
    samples = [task.sample(T, float(d), i) for i, d in enumerate(np.linspace(0, 1, 150))]
    offsets = [s.offset for s in samples]
    assert set(offsets) == set(range(S))  # every offset, 0 and S - 1 included (150 draws of 15)
    assert {offset_bucket(o, S) for o in offsets} == {label for label, _, _ in offset_buckets(S)}
    moved = 0
    for s in samples:
        A = len(s.answer)
        q_last = s.prompt_len - 1
        assert q_last % S == s.offset  # the question's last token is at its offset within its chunk
        assert q_last == T - S + s.offset or (q_last == T - 2 * S + s.offset and T - S + s.offset + A >= T)
        moved += q_last < T - S
        np.testing.assert_array_equal(s.tokens[s.prompt_len : s.prompt_len + A], s.answer)  # the whole answer
        assert s.needle_chunks(S).max() <= q_last // S - 2
        np.testing.assert_array_equal(s.tokens[s.key_positions[0] - 3 : s.key_positions[0]],
                                      s.tokens[s.prompt_len - 3 : s.prompt_len])
        ex = s.example(TOK.pad_id)
        assert ex["answer"].sum() == A and ex["mask"].sum() == s.prompt_len + A
    assert moved > 0  # the case where the answer does not fit after the last chunk was exercised
    # Deterministic per sample, and the aligned task keeps offset 0.
    assert [task.sample(T, float(d), i).offset for i, d in enumerate(np.linspace(0, 1, 150))][:20] == offsets[:20]
    assert NiahTask(kind, TOK, HAY, S, seed=5, align="chunk").sample(T, 0.5, 3).offset == 0


def test_offset_argument_and_bad_layouts():
    task = NiahTask("single", TOK, HAY, 15)
    assert task.sample(600, 0.5, 0, offset=14).prompt_len - 1 == 600 - 30 + 14
    with pytest.raises(TaskError, match=r"offset 15 must be in \[0, 15\)"):
        task.sample(600, 0.5, 0, offset=15)
    with pytest.raises(TaskError, match="align='grid': choose one of random, chunk, pad"):
        NiahTask("single", TOK, HAY, 15, align="grid")


@pytest.mark.parametrize("S, want", [(63, ["0", "1-15", "16-47", "48-62"]), (64, ["0", "1-15", "16-47", "48-63"]),
                                     (15, ["0", "1-3", "4-11", "12-14"]), (4, ["0", "1-2", "3"]), (1, ["0"])])
def test_offset_buckets(S, want):
    assert [label for label, _, _ in offset_buckets(S)] == want
    # Every offset of [0, S) falls in exactly one bucket, in order.
    assert [offset_bucket(o, S) for o in range(S)] == sorted(
        [label for label, lo, hi in offset_buckets(S) for _ in range(lo, hi)], key=want.index)
    assert [o for _, lo, hi in offset_buckets(S) for o in range(lo, hi)] == list(range(S))
    with pytest.raises(TaskError, match="must be in"):
        offset_bucket(S, S)


def test_data_config_niah_align():
    from drt_jax.data.config import NIAH_ALIGNS, DataConfig, DataError

    assert NIAH_ALIGNS == ALIGNS and DataConfig().niah_align == "pad"
    with pytest.raises(DataError) as err:
        DataConfig(niah_align="grid")
    msg = str(err.value)
    assert "\n" not in msg and "niah_align" in msg and "'random', 'chunk', 'pad'" in msg and "'grid'" in msg


def test_training_registers_the_runs_layout():
    from drt_jax.data.mixture import _REGISTRY
    from drt_jax.tasks.niah import register_niah_tasks
    from drt_jax.train.config import load_run_config
    from drt_jax.train.loop import register_model_tasks

    try:
        for align in ALIGNS:
            run = load_run_config("tiny", ["data.mixture=(('niah_2hop',0.5),)", f"data.niah_align={align}"])
            register_model_tasks(run)
            assert _REGISTRY["niah_2hop"](512, TOK, 0).task.align == align
    finally:
        register_niah_tasks(overwrite=True)  # the import-time defaults, for the tests that follow
    assert _REGISTRY["niah_single"](512, TOK, 0).task.align == "pad"


def test_training_registers_the_runs_number_of_keyed_distractors():
    """data.niah_distractors sets the keyed needles besides the queried one, in the multi-key task and the
    conversation (whose haystack also holds the passkey's needle); a bad value is a one-line error."""
    from drt_jax.data.config import DataConfig, DataError
    from drt_jax.data.mixture import _REGISTRY
    from drt_jax.tasks.niah import register_niah_tasks
    from drt_jax.train.config import load_run_config
    from drt_jax.train.loop import register_model_tasks

    assert DataConfig().niah_distractors == 5
    with pytest.raises(DataError) as err:
        DataConfig(niah_distractors=-1)
    assert "\n" not in str(err.value) and "niah_distractors" in str(err.value) and "-1" in str(err.value)
    try:
        for n in (0, 2):
            mix = "data.mixture=(('niah_multi',0.5),('niah_conversation',0.5))"
            register_model_tasks(load_run_config("tiny", [mix, f"data.niah_distractors={n}"]))
            multi = _REGISTRY["niah_multi"](1024, TOK, 0).task.sample(1024, 0.5, 0)
            assert len(multi.needle_positions) == n + 1
            conversation = _REGISTRY["niah_conversation"](1024, TOK, 0).task.sample(1024, 0.5, 0)
            assert len(conversation.needle_positions) == n + 2
    finally:
        register_niah_tasks(overwrite=True)  # the import-time defaults, for the tests that follow
    assert len(_REGISTRY["niah_multi"](1024, TOK, 0).task.sample(1024, 0.5, 0).needle_positions) == 6


def test_experiment_configs_keep_the_aligned_layout():
    """The documented recipes and results were made with questions ending on the chunk grid."""
    import pathlib

    from drt_jax.train.config import load_run_config

    configs = sorted((pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("*.py"))
    niah = [p.name for p in configs if any(n.startswith("niah") for n, _ in load_run_config(str(p)).data.mixture)]
    assert {"drt-20m.py", "drt-20m-niah.py", "drt-20m-2hop.py", "swa-20m-niah.py"} <= set(niah)
    assert all(load_run_config(str(p)).data.niah_align == "chunk" for p in configs if p.name in niah)
