"""answer_turn's snapshot of the device state for its second pass: where a device copy does not fit
(drt-20m, 4M tokens x batch 5 ran out of memory on an 80 GB H100), it waits on the host, and the answer,
its loss, its retrieval (chunks and weights) and the state that follows are those of the device copy."""

import gc

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax import DRT
from drt_jax.evaluate import niah
from drt_jax.inference import InferenceEngine, memory
from drt_jax.inference.memory import DeviceState
from tests.conftest import small_config

B, P, A = 2, 22, 6  # 4-token chunks: the answers close a chunk while they are decoded, the next step another
_GET, _SNAPSHOT = jax.device_get, niah._snapshot


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


def _run(eng, prompts, answers, monkeypatch, free) -> dict:
    """answer_diagnostics and answer_turn (feed_answer) with device_free_bytes() = free, then one more step."""
    monkeypatch.setattr(memory, "device_free_bytes", lambda: free)
    # A GPU's device_get copies to the host; the CPU's returns views of the device buffers, which keep
    # the steps from donating them (XLA then copies them), so here it copies as a GPU's does.
    on_host = []
    monkeypatch.setattr(jax, "device_get", lambda x: on_host.append(isinstance(x, list)) or jax.tree.map(np.array, _GET(x)))
    live = []  # device bytes in use as each snapshot is given back
    monkeypatch.setattr(niah, "_snapshot", lambda dev: (lambda restore: lambda: live.append(_live_bytes()) or restore())(
        _SNAPSHOT(dev)))
    diag = niah.answer_diagnostics(eng, prompts, answers)
    state = eng.init_state()
    before = _live_bytes()  # parameters, compiled constants, the fresh state (donated to the prefill)
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
    return out | {"snapshots_on_host": sum(on_host), "live": live, "before": before}


@pytest.mark.parametrize("offload", [None, "host"])
def test_host_snapshot_gives_what_the_device_copy_does(model, monkeypatch, offload):
    cfg, params, prompts, answers = model
    eng = InferenceEngine(cfg, params, batch_size=B, max_chunks=16, memory_block=16, segment_chunks=3, offload=offload)
    copy = _run(eng, prompts, answers, monkeypatch, None)  # no limit (CPU): the device copy
    # Room for the engine's one state (its capacity check), none for a copy beside it: the host snapshot.
    host = _run(eng, prompts, answers, monkeypatch, niah._STEP_HEADROOM)
    assert copy["snapshots_on_host"] == 0 and host["snapshots_on_host"] == 2  # one per answer
    # generated, loss, retrieved, weights of answer_diagnostics, then of answer_turn
    for i, (a, b) in enumerate(zip(copy["results"], host["results"], strict=True)):
        if i % 4 == 1:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
        else:
            np.testing.assert_array_equal(a, b)
    # The returned state, and what the next step (which closes a chunk) makes of it.
    assert copy["counters"] == host["counters"] and copy["committed"] == host["committed"]
    for key in ("leaves", "host", "next"):
        assert len(copy[key]) == len(host[key])
        for a, b in zip(copy[key], host[key], strict=True):
            np.testing.assert_array_equal(a, b)
    # One state on the device as the snapshot comes back: the teacher-forced pass's is gone (the fresh
    # state counted in `before` was donated to the prefill; the snapshot is still on the host).
    assert len(host["live"]) == 2 and host["live"][-1] < host["before"]


def test_fit_decision_keeps_a_margin_and_placement(monkeypatch):
    dev = DeviceState(cache={"x": jnp.zeros((500,), jnp.float32)},
                      mem_lmk=jax.device_put(jnp.ones((500,), jnp.float32), jax.devices()[0]))  # 4,000 bytes
    assert not dev.cache["x"].committed and dev.mem_lmk.committed
    gets = []
    monkeypatch.setattr(jax, "device_get", lambda x: gets.append(1) or _GET(x))
    fits = int((4000 + niah._STEP_HEADROOM) / 0.9) + 1  # 90% of it less the headroom holds the copy
    for free, on_host in [(None, False), (fits, False), (fits - 2, True), (niah._STEP_HEADROOM + 4000, True)]:
        monkeypatch.setattr(memory, "device_free_bytes", lambda free=free: free)
        gets.clear()
        back = niah._snapshot(dev)()
        assert bool(gets) == on_host, free
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(dev), strict=True):
            np.testing.assert_array_equal(a, b)
            assert a.sharding == b.sharding and a.committed == b.committed
