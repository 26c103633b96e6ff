"""answer_turn's snapshot of the device state for its greedy pass leaves out the chunk memory, which
is most of the state (two full copies of drt-20m's state at 4M tokens x batch 5 did not fit an 80 GB
H100): the answer, its loss, its retrieval (chunks and weights) and the state that follows are those of
a greedy pass from a full copy of the state, with the chunk memory on the device or on the host."""

import gc

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax import DRT
from drt_jax.evaluate import niah
from drt_jax.inference import InferenceEngine
from tests.conftest import small_config

B, P, A = 2, 22, 6  # 4-token chunks: the answers close a chunk while they are decoded, the next step another
_SNAPSHOT = niah._snapshot


@pytest.fixture(scope="module")
def model():
    cfg = small_config()
    params = nn.unbox(jax.jit(DRT(cfg).init)(jax.random.PRNGKey(1), jnp.zeros((1, 16), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    prompts, answers = (rng.integers(0, 60, (B, n)).astype(np.int32) for n in (P, A))
    return cfg, params, prompts, answers


def _live_bytes() -> int:
    gc.collect()  # arrays in reference cycles would otherwise count until a collection happens to run
    return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())


def _full_copy(dev):
    """The snapshot the greedy pass would need if the chunk memory were not rewritten: all of it."""
    copy = jax.tree.map(jnp.copy, dev)
    return lambda after: copy


def _run(eng, prompts, answers, monkeypatch, snapshot) -> dict:
    """answer_diagnostics and answer_turn (feed_answer) with niah's snapshot, then one more step."""
    held = []  # (device bytes each snapshot holds, the chunk memory's bytes then)
    monkeypatch.setattr(niah, "_snapshot", lambda dev: (lambda before: (
        lambda restore: held.append((_live_bytes() - before, memory_bytes(dev))) or restore)(snapshot(dev)))(_live_bytes()))
    diag = niah.answer_diagnostics(eng, prompts, answers)
    state = eng.init_state()
    *turn, state = niah.answer_turn(eng, state, prompts, answers, feed_answer=True)
    assert state.n_chunks > eng.prefill(eng.init_state(), prompts)[1].n_chunks  # the answer closed a chunk
    assert (state.ntok + 1) % eng.cfg.chunk_size == 0  # and so does the next step
    out = {"results": [*diag, *turn], "counters": (state.pos, state.ntok, state.n_chunks),
           "leaves": [np.asarray(x) for x in jax.tree.leaves(state.dev)],
           "committed": [x.committed for x in jax.tree.leaves(state.dev)],
           "host": [] if state.host is None else [state.host.k[:, : state.n_chunks].copy(),
                                                  state.host.v[:, : state.n_chunks].copy()]}
    logits, after = eng.step(state, answers[:, 0])
    out["next"] = [np.asarray(logits), *(np.asarray(x) for x in jax.tree.leaves(after.dev))]
    return out | {"held": held, "capacity": eng.capacity(state)}


def memory_bytes(dev) -> int:
    return sum(x.nbytes for x in (dev.mem_lmk, dev.mem_k, dev.mem_v) if x is not None)


@pytest.mark.parametrize("grows", [False, True])
@pytest.mark.parametrize("offload", [None, "host"])
def test_snapshot_without_the_chunk_memory_gives_what_a_full_copy_does(model, monkeypatch, offload, grows):
    cfg, params, prompts, answers = model
    # grows: memory blocks of one chunk and an answer of 14 tokens, whose teacher-forced pass closes
    # three chunks and so grows the memory (device and host) past what the prefill reserved.
    block = 1 if grows else 16
    if grows:
        answers = np.random.default_rng(1).integers(0, 60, (B, 14)).astype(np.int32)
    eng = InferenceEngine(cfg, params, batch_size=B, max_chunks=block, memory_block=block, segment_chunks=3,
                          offload=offload)
    reserved = eng.capacity(eng.prefill(eng.init_state(), prompts)[1])
    full = _run(eng, prompts, answers, monkeypatch, _full_copy)
    light = _run(eng, prompts, answers, monkeypatch, _SNAPSHOT)
    # generated, loss, retrieved, weights of answer_diagnostics, then of answer_turn
    for i, (a, b) in enumerate(zip(full["results"], light["results"], strict=True)):
        if i % 4 == 1:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
        else:
            np.testing.assert_array_equal(a, b)
    # The returned state, and what the next step (which closes a chunk) makes of it.
    assert full["counters"] == light["counters"] and full["committed"] == light["committed"]
    for key in ("leaves", "host", "next"):
        assert len(full[key]) == len(light[key])
        for a, b in zip(full[key], light[key], strict=True):
            np.testing.assert_array_equal(a, b)
    assert (light["capacity"] > reserved) == grows
    # One snapshot per answer; the light one holds no chunk memory, the full one all of it.
    assert len(light["held"]) == len(full["held"]) == 2
    for (f, memory), (h, _) in zip(full["held"], light["held"], strict=True):
        assert f - h >= memory > 0, (f, h, memory)
