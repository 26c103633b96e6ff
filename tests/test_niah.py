"""NIAH tasks: layout aligned to the model's chunks, determinism, fine-tuning examples, scoring."""

import numpy as np
import pytest

from drt_jax.data import ByteTokenizer
from drt_jax.tasks.niah import KINDS, NiahSource, NiahTask, TaskError, make_niah_factory, score_exact

TOK = ByteTokenizer()
HAY = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 100, np.uint8).astype(np.int32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("S", [15, 63])
def test_layout_and_alignment(kind, S):
    task = NiahTask(kind, TOK, HAY, S, seed=3)
    T = 40 * S + 7  # not a multiple of S: rounded down to whole chunks
    for depth in (0.0, 0.5, 1.0):
        s = task.sample(T, depth, 1)
        assert s.tokens.shape == (T,) and s.tokens.dtype == np.int32
        # The question's last token is the first slot of the last whole chunk.
        assert s.prompt_len - 1 == (T // S) * S - S
        np.testing.assert_array_equal(s.tokens[s.prompt_len : s.prompt_len + len(s.answer)], s.answer)
        text = bytes(s.tokens[: s.prompt_len].tolist())
        q = {"single": b"|What is the passkey? The passkey is:", "multi": b"|The special magic number for ",
             "2hop": b"|The path from "}[kind]
        assert q in text[-60:]
        # The queried needle sits at `depth` of the room and at least 2 chunks before the question.
        first = s.needle_positions[0]
        assert first < s.prompt_len - len(q) - 2 * S
        if depth == 0.0:
            assert first == 0
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
