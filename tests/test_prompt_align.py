"""Prompt alignment (ModelConfig.prompt_align, issue 25): the engine left-pads a prompt so that it ends on
a chunk's first slot, also for a later turn mid-chunk; the result is the full forward of the padded
tokens; NIAH fine-tuning data (align="pad") is laid out by the same rule; prefill segments come in a
bounded set of shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax import DRT, ModelConfig, chunking
from drt_jax.config import ConfigError
from drt_jax.data import ByteTokenizer
from drt_jax.inference import InferenceEngine
from drt_jax.inference.engine import segment_length
from drt_jax.tasks.niah import KINDS, NiahTask

B = 2


def _model(**kw):
    cfg = ModelConfig.from_preset("tiny", **kw)
    params = nn.unbox(DRT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32))["params"])
    return cfg, params


def test_prompt_padding_puts_the_last_token_on_a_chunks_first_slot():
    S = 15
    for consumed in (0, 1, 14, 15, 31):
        for n in range(1, 3 * S):
            p = chunking.prompt_padding(consumed, n, S)
            assert 0 <= p < S and (consumed + p + n - 1) % S == 0, (consumed, n, p)
    assert chunking.prompt_padding(0, 1, S) == 0 and chunking.prompt_padding(0, 2, S) == S - 1


def test_aligned_prefill_and_a_second_turn_match_the_forward_of_the_padded_tokens():
    cfg, params = _model()
    S, pad = cfg.chunk_size, cfg.pad_id
    rng = np.random.default_rng(0)
    turn1, reply, turn2, more = (rng.integers(0, 256, (B, n)).astype(np.int32) for n in (100, 4, 23, 5))
    eng = InferenceEngine(cfg, params, batch_size=B, max_chunks=16, memory_block=16, segment_chunks=3)
    logits1, st = eng.prefill(eng.init_state(), turn1, all_logits=True)
    p1 = chunking.prompt_padding(0, 100, S)
    assert p1 == 6 and st.ntok == 106 and st.ntok % S == 1  # the last prompt token opens a chunk
    outs = [np.asarray(logits1)]
    for t in range(reply.shape[1]):  # the answer: decode steps, leaving the state mid-chunk
        lg, st = eng.step(st, reply[:, t])
        outs.append(np.asarray(lg)[:, None])
    p2 = chunking.prompt_padding(st.ntok, turn2.shape[1], S)
    assert st.ntok % S and p2 > 0
    logits2, st = eng.prefill(st, turn2, all_logits=True)
    assert st.ntok % S == 1
    outs.append(np.asarray(logits2))
    for t in range(more.shape[1]):
        lg, st = eng.step(st, more[:, t])
        outs.append(np.asarray(lg)[:, None])
    got = np.concatenate(outs, axis=1)

    def pads(n):
        return np.full((B, n), pad, np.int32)

    seq = np.concatenate([pads(p1), turn1, reply, pads(p2), turn2, more], axis=1)
    ref = np.asarray(jax.jit(lambda p, t: DRT(cfg).apply({"params": p}, t))(params, seq))
    keep = np.r_[p1 : p1 + 100 + 4, p1 + 104 + p2 : seq.shape[1]]  # every position but the pads
    assert got.shape == (B, len(keep), cfg.vocab_size)
    np.testing.assert_array_less(np.abs(got - ref[:, keep]).max(), 1e-4)
    # ... and it is not what the unpadded tokens give: the alignment changed what the model saw.
    raw = np.concatenate([turn1, reply, turn2, more], axis=1)
    unaligned = np.asarray(jax.jit(lambda p, t: DRT(cfg).apply({"params": p}, t))(params, raw))
    assert np.abs(got - unaligned).max() > 1e-2


def test_prompt_align_none_and_the_baselines_feed_the_tokens_as_given():
    tokens = np.random.default_rng(1).integers(0, 256, (B, 40)).astype(np.int32)
    for kw in ({"prompt_align": "none"}, {"arch": "swa", "decoder_layers": (2,)}):
        cfg, params = _model(**kw)
        eng = InferenceEngine(cfg, params, batch_size=B, max_chunks=16, memory_block=16, segment_chunks=3)
        _, st = eng.prefill(eng.init_state(), tokens)
        assert st.ntok == 40
    cfg, params = _model()
    eng = InferenceEngine(cfg, params, batch_size=B, max_chunks=16, memory_block=16, segment_chunks=3)
    assert eng.prefill(eng.init_state(), tokens, align=False)[1].ntok == 40
    assert eng.prefill(eng.init_state(), tokens)[1].ntok == 40 + chunking.prompt_padding(0, 40, 15)
    with pytest.raises(ConfigError, match="prompt_align='left' is not one of"):
        ModelConfig.from_preset("tiny", prompt_align="left")


@pytest.mark.parametrize("kind", KINDS)
def test_pad_layout_is_the_engines_alignment_of_the_unpadded_prompt(kind):
    """A fine-tuning sample of align="pad" is what the engine feeds the model for the same prompt
    without its lead: training and inference see one layout."""
    tok = ByteTokenizer()
    hay = np.frombuffer(b"def f(x):\n    return x + 1\n" * 200, np.uint8).astype(np.int32)
    S, T = 15, 40 * 15 + 7
    task = NiahTask(kind, tok, hay, S, seed=2, align="pad")
    leads = set()
    for i in range(40):
        s = task.sample(T, i / 39, i)
        prompt = s.tokens[s.lead : s.prompt_len]
        assert chunking.prompt_padding(0, len(prompt), S) == s.lead
        assert (len(prompt) - 1) % S == s.offset
        ex = s.example(tok.pad_id)
        assert not ex["mask"][: s.lead].any() and ex["mask"][s.lead : s.prompt_len].all()
        leads.add(s.lead)
    assert len(leads) > 5  # the lead varies with the drawn offset


def test_segments_come_in_a_bounded_set_of_shapes():
    seg = 256 * 63
    assert segment_length(10 * seg, 63, seg) == seg
    assert [segment_length(r * 63 + 5, 63, seg) // 63 for r in (1, 2, 3, 200, 255)] == [1, 2, 2, 128, 128]
    assert segment_length(10, 1, 45) == 8
    cfg, params = _model()
    eng = InferenceEngine(cfg, params, batch_size=1, max_chunks=16, memory_block=16, segment_chunks=4)
    sizes = []
    # 7 chunks and 3 tokens: a whole segment of 4 chunks, then 2, then 1, then 3 decode steps.
    _, st = eng.prefill(eng.init_state(), np.arange(7 * 15 + 3)[None] % 200, align=False, progress=sizes.append)
    assert sizes == [60, 30, 15] and st.ntok == 108


def test_niah_sweep_aligns_batches_and_counts_the_pads_in_needle_chunks(monkeypatch):
    """The sweep pads each prompt as the engine would, batches prompts of equal padded length, and
    shifts the needle chunk ids by the pads (else recall would score the wrong chunks)."""
    from drt_jax.evaluate import niah

    tok = ByteTokenizer()
    hay = np.frombuffer(b"def f(x):\n    return x + 1\n" * 200, np.uint8).astype(np.int32)
    batches = []
    real = niah.answer_diagnostics
    monkeypatch.setattr(niah, "answer_diagnostics", lambda eng, p, a: batches.append(p.shape) or real(eng, p, a))
    for align, want_pads in (("chunk", True), ("none", False)):
        cfg, params = _model(prompt_align=align)
        batches.clear()
        r = niah.niah_sweep(cfg, params, tok, hay, task="single", lengths=[300], depths=[0.5], samples=6,
                            batch_size=6, seed=1)
        task = NiahTask("single", tok, hay, cfg.chunk_size, seed=1)
        for i, rec in enumerate(r["records"]):
            s = task.sample(300, 0.5, i)
            pads = chunking.prompt_padding(0, s.prompt_len, cfg.chunk_size) if want_pads else 0
            assert rec["pads"] == pads and rec["offset"] == s.offset
            assert rec["needle_chunks"] == s.needle_chunks(cfg.chunk_size, pads).tolist()
        assert len({rec["offset"] for rec in r["records"]}) > 1
        # Aligned, every prompt ends on a chunk's first slot: two lengths at most (the question's last
        # whole chunk, or the one before where the answer would not fit).
        assert sum(b for b, _ in batches) == 6
        if want_pads:
            assert len({rec["pads"] for rec in r["records"]}) > 1 and len(batches) <= 2
            assert all(n % cfg.chunk_size == 1 for _, n in batches)
        else:
            assert len(batches) > 2
