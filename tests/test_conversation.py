"""The two-question NIAH conversation (issue 25 item 3): its layout, the fine-tuning example as the engine's
token stream, and the evaluation sweep that feeds the model's own first answer back before the second
question."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax import DRT, chunking
from drt_jax.data import ByteTokenizer
from drt_jax.tasks.niah import ConversationTask, TaskError, make_niah_factory
from tests.test_prompt_align import _model

TOK = ByteTokenizer()
HAY = np.frombuffer(b"def f(x):\n    return x + 1\n" * 200, np.uint8).astype(np.int32)
PASSKEY_Q, KEYED_Q = b"|What is the passkey? The passkey is:", b"|The special magic number for "


def _text(tokens) -> bytes:
    assert all(0 <= t < 256 for t in tokens)  # no special ids inside a turn or an answer
    return bytes(int(t) for t in tokens)


def _engine_stream(s, answer1=None):
    """The tokens an aligning engine holds after the conversation, built here from chunking.prompt_padding
    (not from the task's turn_pads): pads, turn 1, answer 1, pads, turn 2, answer 2."""
    S, pad = s.chunk_size, TOK.pad_id
    a1 = s.answers[0] if answer1 is None else np.asarray(answer1)
    p1 = chunking.prompt_padding(0, len(s.turns[0]), S)
    p2 = chunking.prompt_padding(p1 + len(s.turns[0]) + len(a1), len(s.turns[1]), S)
    return np.concatenate([np.full(p1, pad), s.turns[0], a1, np.full(p2, pad), s.turns[1], s.answers[1]]), (p1, p2)


@pytest.mark.parametrize("S", [15, 63])
def test_layout(S):
    task = ConversationTask(TOK, HAY, S, seed=4)
    T = 60 * S + 7
    offsets = set()
    for i, depth in enumerate(np.linspace(0, 1, 40)):
        s = task.sample(T, float(depth), i)
        (t1, t2), (a1, a2) = s.turns, s.answers
        o1, o2 = s.offsets
        offsets |= {o1, o2}
        # Each question ends at its recorded offset: turn 1 in its chunk, turn 2 in the conversation
        # without pads, after answer 1.
        assert (len(t1) - 1) % S == o1 and (len(t1) + len(a1) + len(t2) - 1) % S == o2
        text1, text2 = _text(t1), _text(t2)
        assert text1.endswith(PASSKEY_Q) and KEYED_Q in text2 and len(text2) < len(KEYED_Q) + 10 + S
        # The needles sit where recorded and hold the answers at key_positions.
        p, k = s.needle_positions[:2]
        assert text1[p:].startswith(b"|The passkey is:" + _text(a1) + b"|")
        key = text2[text2.index(KEYED_Q) + len(KEYED_Q) : -len(b" is ")]
        assert text1[k:].startswith(b"|One of the special magic numbers for " + key + b" is " + _text(a2) + b"|")
        assert text1.count(b"|One of the special magic numbers for ") == 6  # the queried one and 5 distractors
        for q, answer in enumerate((a1, a2)):
            np.testing.assert_array_equal(t1[list(s.key_positions[q])], answer)
            assert text1.count(_text(answer)) == 1
        # Depth places the passkey needle, the keyed one right after it.
        assert k == p + len(b"|The passkey is:") + len(a1) + 1
        # The aligned conversation is the longest that fits: less than a chunk is left over.
        stream, (p1, p2) = _engine_stream(s)
        assert T - S < len(stream) <= T
        # Aligned, each question's last token opens a chunk, and the needles are >= 2 chunks before it.
        q1_end, q2_end = p1 + len(t1) - 1, len(stream) - len(a2) - 1
        assert q1_end % S == 0 and q2_end % S == 0
        assert s.needle_chunks(0, p1).max() <= q1_end // S - 2 and s.needle_chunks(1, p1).max() <= q1_end // S - 2
    assert offsets == set(range(S)) if S == 15 else len(offsets) > 30
    # Deterministic per (seed, length, depth, index); other indices differ.
    a, b, c = task.sample(T, 0.5, 2), task.sample(T, 0.5, 2), task.sample(T, 0.5, 3)
    np.testing.assert_array_equal(a.turns[0], b.turns[0])
    assert a.offsets == b.offsets and not np.array_equal(a.answers[1], c.answers[1])
    # Given offsets land where asked; bad requests are one-line errors naming the fix.
    s = task.sample(T, 0.5, 0, offsets=(S - 1, 0))
    assert (len(s.turns[0]) - 1) % S == S - 1 and (len(s.turns[0]) + 5 + len(s.turns[1]) - 1) % S == 0
    with pytest.raises(TaskError, match=rf"offsets \(0, {S}\) must be two offsets in \[0, {S}\)"):
        task.sample(T, 0.5, 0, offsets=(0, S))
    with pytest.raises(TaskError, match="too short for the NIAH conversation .* needs >= "):
        task.sample(task.min_length() - 1, 0.5, 0)
    task.sample(task.min_length(), 1.0, 0)  # the shortest context holds a whole conversation
    assert ConversationTask(TOK, HAY, S, align="chunk").sample(T, 0.5, 1).offsets == (0, 0)


@pytest.mark.parametrize("align", ["pad", "random", "chunk"])
def test_example_is_the_stream_the_engine_builds(align):
    S, T = 15, 600
    task = ConversationTask(TOK, HAY, S, seed=2, align=align)
    pads_seen = set()
    for i in range(20):
        ex = task.example(T, i)
        s = task.sample(T, task.niah.draw_depth(i), i)
        want, (p1, p2) = _engine_stream(s)
        if align != "pad":  # the conversation without pads: what an engine that does not align feeds
            pads_seen.add((p1, p2))
            want, (p1, p2) = np.concatenate([s.turns[0], s.answers[0], s.turns[1], s.answers[1]]), (0, 0)
        n = len(want)
        assert all(v.shape == (T,) and v.dtype == np.int32 for v in ex.values())
        np.testing.assert_array_equal(ex["tokens"][:n], want)
        assert (ex["tokens"][n:] == TOK.pad_id).all()
        # LM loss on every real token up to answer 2's end; none on the pads (before turns, or after).
        np.testing.assert_array_equal(ex["mask"], (np.arange(T) < n) & (ex["tokens"] != TOK.pad_id))
        a1_start = p1 + len(s.turns[0])
        answer = np.zeros(T, np.int32)
        answer[a1_start : a1_start + 5] = answer[n - 5 : n] = 1
        np.testing.assert_array_equal(ex["answer"], answer)
        np.testing.assert_array_equal(ex["tokens"][answer == 1], np.concatenate(s.answers))
        np.testing.assert_array_equal(np.flatnonzero(ex["needle"]), np.asarray(s.key_positions[0]) + p1)
        np.testing.assert_array_equal(ex["tokens"][ex["needle"] == 1], s.answers[0])
        pads_seen.add((p1, p2))
    if align == "pad":
        assert len({p for p, _ in pads_seen}) > 3 and len({p for _, p in pads_seen}) > 3
    elif align == "chunk":
        assert pads_seen == {(0, 0)}  # offsets 0: the engine adds no pads, so this too is its stream


def test_registered_with_the_mixture():
    import drt_jax.tasks.niah  # noqa: F401  (registers on import)
    from drt_jax.data.mixture import build_task_dataset, registered_tasks

    assert "niah_conversation" in registered_tasks()
    ex = build_task_dataset("niah_conversation", 1024, TOK, 0)[3]  # S = 63, the default corpus
    assert ex["answer"].sum() == 10 and ex["needle"].sum() == 5 and ex["mask"].sum() > 900
    src = make_niah_factory("conversation", chunk_size=15, haystack=HAY, align="pad")(600, TOK, 0)
    np.testing.assert_array_equal(src[3]["tokens"], src.task.example(600, 3)["tokens"])


def test_engine_reads_the_example_as_its_own_conversation():
    """Fed the conversation turn by turn (the engine aligns each turn), the engine computes what one
    forward pass over the fine-tuning example computes at every real token: one layout in training and
    inference."""
    from drt_jax.inference import InferenceEngine

    cfg, params = _model()
    S = cfg.chunk_size
    task = ConversationTask(TOK, HAY, S, seed=5, align="pad")
    s = task.sample(600, 0.4, 1)
    p1, p2 = s.pads()
    assert p1 and p2  # both turns padded: turn 2 starts mid-chunk
    eng = InferenceEngine(cfg, params, max_chunks=48, memory_block=48)
    outs, state = [], eng.init_state()
    for turn, answer in zip(s.turns, s.answers, strict=True):
        logits, state = eng.prefill(state, turn[None], all_logits=True)
        outs.append(np.asarray(logits[0]))
        for t in answer:
            lg, state = eng.step(state, [t])
            outs.append(np.asarray(lg))
    got = np.concatenate(outs)
    ex = task.example(600, 1, depth=0.4)
    ref = np.asarray(jax.jit(lambda p, t: DRT(cfg).apply({"params": p}, t))(params, ex["tokens"][None]))[0]
    real = np.flatnonzero(ex["mask"])
    assert got.shape == (len(real), cfg.vocab_size) and state.ntok == real[-1] + 1
    np.testing.assert_array_less(np.abs(got - ref[real]).max(), 1e-4)


@pytest.fixture(scope="module")
def sweeps():
    """conversation_sweep on a tiny random model, aligned and not, and the prompts each prefill got."""
    from drt_jax.evaluate import niah
    from drt_jax.inference import InferenceEngine

    fed, real = [], InferenceEngine.prefill
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InferenceEngine, "prefill", lambda self, st, tokens, **kw: fed.append(np.asarray(tokens)) or
                   real(self, st, tokens, **kw))
        for align in ("chunk", "none"):
            cfg, params = _model(prompt_align=align)
            fed.clear()
            r = niah.conversation_sweep(cfg, params, TOK, HAY, lengths=[600], depths=[0.2, 0.8], samples=3, seed=1)
            out[align] = (cfg, params, r, list(fed))
    return out


def test_sweep_records_count_the_pads_and_feed_the_turns(sweeps):
    for align, (cfg, _, r, fed) in sweeps.items():
        S = cfg.chunk_size
        task = ConversationTask(TOK, HAY, S, seed=1)
        assert len(r["records"]) == 6 and len(fed) == 12 and r["task"] == "conversation"
        shifted = 0
        for n, rec in enumerate(r["records"]):
            s = task.sample(600, rec["depth"], rec["index"])
            # The sweep gives the engine the turns as the user sends them; the engine pads.
            np.testing.assert_array_equal(fed[2 * n][0], s.turns[0])
            np.testing.assert_array_equal(fed[2 * n + 1][0], s.turns[1])
            stream, pads = _engine_stream(s, rec["questions"][0]["generated"])
            assert rec["pads"] == (list(pads) if align == "chunk" else [0, 0])
            for q, row in enumerate(rec["questions"]):
                keys = np.asarray(s.key_positions[q])
                assert row["offset"] == s.offsets[q] and row["answer"] == s.answers[q].tolist()
                assert row["needle_chunks"] == np.unique((keys + rec["pads"][0]) // S).tolist()
                shifted += row["needle_chunks"] != np.unique(keys // S).tolist()
                assert row["correct"] == (row["generated"] == row["answer"])
            assert rec["both_correct"] == all(q["correct"] for q in rec["questions"])
        assert (shifted > 0) == (align == "chunk")  # the pads moved some needle chunk
        # The keyed question has the other keys' values as distractors, read from turn 1; the passkey none.
        for rec in r["records"]:
            s = task.sample(600, rec["depth"], rec["index"])
            first, second = rec["questions"]
            assert not {"distractor_recall", "distractor_weight", "answered_distractor"} & set(first)
            others = [p for ps in s.distractor_positions[1] for p in ps]
            assert len(s.distractor_positions[0]) == 0 and len(s.distractor_positions[1]) == 5
            assert second["distractor_chunks"] == np.unique((np.asarray(others) + rec["pads"][0]) // S).tolist()
            values = [s.turns[0][list(ps)] for ps in s.distractor_positions[1]]
            assert second["answered_distractor"] == any(second["generated"][:5] == v.tolist() for v in values)
            for g, got in second["distractor_recall"].items():
                assert got == np.isin(second["distractor_chunks"], second["retrieved"][g]).mean()
                # One retrieval's weight, shared by the needle's chunks, the distractors' and the rest.
                assert 0.0 <= second["needle_weight"][g] + second["distractor_weight"][g] <= 1.0 + 1e-4
        assert "answered_distractor" not in r["questions"][0] and "answered_distractor" in r["questions"][1]
        # Both questions' tables, and the by-offset breakdown of each question's own offsets.
        for q, view in enumerate(r["questions"]):
            assert set(view["needle_recall"]) == {"g0", "g1"}
            assert sum(view["by_offset"]["samples"]["600"].values()) == 6
            offsets = [rec["questions"][q]["offset"] for rec in r["records"] if rec["depth"] == 0.2]
            want = np.mean([rec["questions"][q]["correct"] for rec in r["records"] if rec["depth"] == 0.2])
            assert view["accuracy"]["600"]["0.2"] == want and len(offsets) == 3
        assert r["accuracy"]["600"]["0.8"] == np.mean([rec["both_correct"] for rec in r["records"][3:]])


def test_sweep_answers_match_the_full_forward_of_the_padded_stream(sweeps):
    """Each answer's teacher-forced loss, greedy answer and retrieval equal what one forward pass over the
    engine's padded stream gives, where answer 2 follows the model's own answer 1 (as
    tests/test_diagnostics.py checks for one question)."""
    cfg, params, r, _ = sweeps["chunk"]
    S = cfg.chunk_size
    task = ConversationTask(TOK, HAY, S, seed=1)
    model = DRT(cfg)
    forward = jax.jit(lambda t: model.apply({"params": params}, t, mutable=["intermediates"]))
    differs = False
    for rec in r["records"][:2]:
        s = task.sample(600, rec["depth"], rec["index"])
        own = rec["questions"][0]["generated"]
        logps, inters = [], []
        for answer1 in (own, s.answers[0]):  # the model's own answer 1, then the true one
            stream, (p1, p2) = _engine_stream(s, answer1)
            logits, inter = forward(jnp.asarray(stream[None]))
            logps.append(np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), -1)))
            inters.append(inter["intermediates"])
        ends = [p1 + len(s.turns[0]) - 1, len(stream) - 6]  # each question's last token
        # Answer 1 is teacher-forced on the true answer 1; answer 2 on the context of the model's own answer 1.
        for q, (end, logp, inter) in enumerate(zip(ends, logps[::-1], inters[::-1], strict=True)):
            row, answer = rec["questions"][q], s.answers[q]
            np.testing.assert_allclose(row["answer_loss"], -logp[end + np.arange(5), answer].mean(), rtol=1e-4)
            assert row["generated"][0] == int(np.argmax(logp[end]))
            for g in range(len(cfg.groups)):
                full = np.asarray(inter[f"retrieval_indices_g{g}"][0])[0, end // S - 1]
                assert row["retrieved"][f"g{g}"] == full.tolist()
        # Greedy: answer 1 fed back token by token is the argmax of the stream that holds it.
        np.testing.assert_array_equal(own, np.argmax(logps[0][ends[0] + np.arange(5)], -1))
        # Fed the true answer 1 instead, answer 2's loss would differ: the check above can tell.
        differs |= abs(-logps[1][ends[1] + np.arange(5), s.answers[1]].mean() - rec["questions"][1]["answer_loss"]) > 1e-3
    assert differs


def test_cli_conversation(tmp_path, capsys):
    from drt_jax.evaluate.cli import main

    story = tmp_path / "story.txt"
    story.write_text("Once upon a time a little dog named Rex liked to run in the park every morning.\n" * 30)
    args = ["niah", "--checkpoint", "random:tiny", "--task", "conversation", "--lengths", "600", "--depths", "0.5",
            "--samples", "2", "--data", str(story)]
    assert main([*args, "--out", str(tmp_path / "conv.json")]) == 0
    res = json.loads((tmp_path / "conv.json").read_text())
    assert res["task"] == "conversation" and len(res["records"]) == 2 and len(res["questions"]) == 2
    assert res["plot"].endswith("conv.png") and (tmp_path / "conv.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    for line in ("question 1 (passkey):", "question 2 (keyed value):", "both answers correct: depth \\ length"):
        assert line in printed
    assert main([*args, "--batch-size", "2"]) == 2
    assert "--task conversation runs one sample at a time" in capsys.readouterr().err
