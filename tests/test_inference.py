"""Incremental inference: decode and prefill reproduce the full forward; offload; fixed state size."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax import DRT, ModelConfig
from drt_jax.inference import InferenceEngine, generate, sample_logits

T = 15 * 9 + 7  # tiny: chunk_size 15 -> 9 full chunks and a partial one
B = 2


def _perturbed_params(cfg, seed=0):
    """Random init with norm gains moved away from 1, so a missing norm (e.g. the landmark norm of a
    retrieval query, the authors' decode bug) changes the result."""
    params = nn.unbox(DRT(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 32), jnp.int32))["params"])
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    out = []
    for (path, x), k in zip(leaves, keys, strict=False):
        if "scale" in jax.tree_util.keystr(path):
            x = x * (1.0 + 0.5 * jax.random.normal(k, x.shape))
        out.append(x)
    return jax.tree_util.tree_unflatten(tree, out)


# tiny has two retrieval groups (multi-hop); (2, 2) is the one-group model.
GROUPS = {"groups2": (2, 1, 1), "groups1": (2, 2)}
CASES = [("rope", "groups2"), ("alibi", "groups2"), ("alibi", "groups1")]


@functools.cache
def _setup(position, groups="groups2"):
    cfg = ModelConfig.from_preset("tiny", position=position, decoder_layers=GROUPS[groups])
    params = _perturbed_params(cfg)
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(7), (B, T), 0, 256), np.int32)
    ref = jax.jit(lambda p, t: DRT(cfg).apply({"params": p}, t))(params, tokens)
    eng = InferenceEngine(cfg, params, batch_size=B, max_chunks=16, memory_block=16, segment_chunks=3)
    return cfg, params, tokens, np.asarray(ref), eng


@pytest.mark.parametrize("position,groups", CASES)
def test_token_by_token_matches_forward(position, groups):
    cfg, params, tokens, ref, eng = _setup(position, groups)
    state = eng.init_state()
    logits = []
    compiled = lambda: (eng._decode[False]._cache_size(), eng._decode[True]._cache_size())
    for t in range(T):
        lg, state = eng.step(state, tokens[:, t])
        logits.append(np.asarray(lg))
        if t == cfg.chunk_size - 1:
            after_first_chunk = compiled()  # both step kinds have run once
    logits = np.stack(logits, axis=1)
    assert state.n_chunks == T // cfg.chunk_size and state.ntok == T
    assert state.pos == T + T // cfg.chunk_size
    np.testing.assert_array_less(np.abs(logits - ref).max(), 1e-4)
    # Fixed shapes: no step compiles again as the context grows. (The compiled steps are shared by
    # every engine of this config in the process, so other tests may have added entries before.)
    assert compiled() == after_first_chunk


@pytest.mark.parametrize("position,groups", CASES)
def test_segment_prefill_then_decode_matches_forward(position, groups):
    cfg, params, tokens, ref, eng = _setup(position, groups)
    # 100 tokens: two segments of 3 chunks (90 tokens), then a partial chunk of 10 tokens fed by steps;
    # the 2nd segment's first chunk reads the 1st segment's last retrieval (the authors' code: nothing).
    prompt = 100
    logits, state = eng.prefill(eng.init_state(), tokens[:, :prompt], align=False, all_logits=True)
    outs = [np.asarray(logits)]
    for t in range(prompt, T):
        lg, state = eng.step(state, tokens[:, t])
        outs.append(np.asarray(lg)[:, None])
    logits = np.concatenate(outs, axis=1)
    assert logits.shape == ref.shape
    np.testing.assert_array_less(np.abs(logits - ref).max(), 1e-4)
    if position == "rope":  # the default (last-token) prefill agrees too
        last, _ = eng.prefill(eng.init_state(), tokens[:, :prompt], align=False)
        np.testing.assert_array_less(np.abs(np.asarray(last) - ref[:, prompt - 1]).max(), 1e-4)


def _teacher_forced(eng, tokens, prompt):
    """Logits [B, T, V] of a segment prefill of `prompt` tokens, then decode steps over the rest."""
    logits, state = eng.prefill(eng.init_state(), tokens[:, :prompt], align=False, all_logits=True)
    outs = [np.asarray(logits)]
    for t in range(prompt, tokens.shape[1]):
        lg, state = eng.step(state, tokens[:, t])
        outs.append(np.asarray(lg)[:, None])
    return np.concatenate(outs, axis=1)


def _without_gca(params):
    """The same weights with every GCA output projection zeroed: what a path that lost retrieval computes."""
    return {k: ({**v, "gca": {**v["gca"], "o": {"kernel": jnp.zeros_like(v["gca"]["o"]["kernel"])}}}
                if k.startswith("group") else v) for k, v in params.items()}


def test_offload_gives_identical_logits_and_bounded_device_state():
    cfg, params, tokens, ref, eng = _setup("rope")
    off = InferenceEngine(cfg, params, batch_size=B, max_chunks=16, memory_block=16, segment_chunks=3, offload="host")
    # Logits, not greedy tokens: a random model's argmax barely depends on what GCA reads. Two prefill
    # segments (the second's chunks read host chunks named by retrievals over both), then decode steps
    # that close chunks (host writes, fetches of the new retrieval).
    got = _teacher_forced(off, tokens, 100)
    np.testing.assert_array_less(np.abs(got - ref).max(), 1e-4)
    np.testing.assert_array_less(np.abs(got - _teacher_forced(eng, tokens, 100)).max(), 1e-5)
    # ... a margin retrieval decides: without GCA the logits move by far more than the tolerance.
    blind = InferenceEngine(cfg, _without_gca(params), batch_size=B, max_chunks=16, memory_block=16, segment_chunks=3)
    assert np.abs(_teacher_forced(blind, tokens, 100) - ref).max() > 1e-2
    prompt = tokens[:, :100]
    a, st_dev = generate(eng, prompt, 40)
    b, st_off = generate(off, prompt, 40)
    np.testing.assert_array_equal(a, b)
    assert st_off.n_chunks == (100 + 39) // cfg.chunk_size
    # Offloaded chunk K/V live on the host; the device keeps only the landmark keys of the memory.
    dev = st_off.dev
    assert dev.mem_k is None and dev.mem_v is None
    assert isinstance(st_off.host.k, np.ndarray) and st_off.host.k.shape[1] == off.capacity(st_off)
    np.testing.assert_array_equal(
        np.asarray(st_dev.dev.mem_k[:, : st_dev.n_chunks]), st_off.host.k[:, : st_off.n_chunks]
    )
    # Device state: same shapes whatever the context once the window is full.
    shapes = st_off.device_arrays()
    st = st_off
    for _t in range(40):
        _, st = off.step(st, np.full((B,), 65, np.int32))
    assert st.n_chunks > st_off.n_chunks and st.device_arrays() == shapes
    # Growing the memory 16x grows the device by one landmark key per chunk, nothing else.
    before = st.device_bytes()
    big = off.ensure_capacity(st, 16 * 16)
    added = big.device_bytes() - before
    itemsize = jnp.dtype(cfg.dtype).itemsize
    assert added == B * (256 - 16) * cfg.d_model * itemsize
    assert big.host.k.shape[1] == 256
    # ... whereas the non-offloaded engine would carry K and V rows for every chunk on the device.
    assert st_dev.dev.mem_k.shape[1] == eng.capacity(st_dev)


def test_sampling_modes():
    logits = jnp.asarray([[0.0, 3.0, 1.0, -1.0], [2.0, 0.0, 0.0, 5.0]])
    rng = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(sample_logits(logits, rng), [1, 3])
    # A tiny nucleus keeps only the argmax; temperature sampling is reproducible and varied.
    np.testing.assert_array_equal(sample_logits(logits, rng, temperature=1.0, top_p=0.05), [1, 3])
    draws = np.stack([sample_logits(logits, jax.random.PRNGKey(i), temperature=5.0) for i in range(40)])
    assert len(np.unique(draws[:, 0])) > 1
    np.testing.assert_array_equal(sample_logits(logits, rng, temperature=5.0), sample_logits(logits, rng, temperature=5.0))
    # top_p=0.9 on [0.85, 0.1, ...] keeps the first two tokens (0.85 < 0.9 <= 0.95) and samples them in
    # proportion, 0.85 : 0.1: the tail never comes, and the runner-up about one draw in nine.
    peaked = jnp.log(jnp.asarray([[0.85, 0.1, 0.04, 0.01]]))
    draws = np.concatenate([sample_logits(jnp.tile(peaked, (50, 1)), jax.random.PRNGKey(i), temperature=1.0, top_p=0.9)
                            for i in range(8)])
    assert set(np.unique(draws)) <= {0, 1}
    assert 0.05 < np.mean(draws == 1) < 0.18, np.mean(draws == 1)


def test_swa_prefill_in_chunk_sized_segments_matches_forward():
    """The swa baseline prefills in segments of segment_chunks * chunk_size tokens (not 1-token units:
    its 1M-token NIAH prefill took 4,096 calls and ran past the GPU machine's limit), and still
    reproduces the forward, across segments longer than its window and a shorter tail."""
    cfg = ModelConfig.from_preset("tiny", arch="swa", decoder_layers=(3,), window=20)
    params = _perturbed_params(cfg)
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(8), (B, T), 0, 256), np.int32)
    ref = np.asarray(jax.jit(lambda p, t: DRT(cfg).apply({"params": p}, t))(params, tokens))
    eng = InferenceEngine(cfg, params, batch_size=B, segment_chunks=3)
    sizes = []
    prompt = 100
    logits, state = eng.prefill(eng.init_state(), tokens[:, :prompt], all_logits=True, progress=sizes.append)
    assert sizes == [45, 45, 8, 2] and 45 > cfg.window, (sizes, cfg.window)
    outs = [np.asarray(logits)]
    for t in range(prompt, T):
        lg, state = eng.step(state, tokens[:, t])
        outs.append(np.asarray(lg)[:, None])
    np.testing.assert_array_less(np.abs(np.concatenate(outs, axis=1) - ref).max(), 1e-4)


def test_plan_reads_fetches_distinct_host_chunks_and_remaps_every_read():
    """An offloaded segment's group fetches each host chunk it reads once (not once per read), none of the
    segment's own chunks (still on the device), and every read - repeated, own, empty - lands on its chunk
    in the memory [own chunks; fetched chunks]."""
    from drt_jax.inference.offload import fetch_rows, plan_reads

    start, C, K = 40, 3, 4
    ids = np.array([[[5, 5, 41, -1], [39, 5, 40, 2], [2, 39, 41, 5], [42, 5, 39, 0]],
                    [[7, 8, 9, 10], [7, 8, 9, 40], [11, 7, 8, 9], [-1, -1, 12, 7]]])  # [B, C + 1, K]
    glob = np.arange(2 * 64 * 3).reshape(2, 64, 3) + 0.5  # [B, E, row]: every chunk of every batch row differs
    rows, local = plan_reads(ids, start, C, (C + 1) * K)
    assert rows.shape == (2, 16) and local.shape == ids.shape and local.dtype == np.int32
    np.testing.assert_array_equal(rows[0, :4], [0, 2, 5, 39])  # ascending, once each, then padding
    np.testing.assert_array_equal(rows[1, :6], [7, 8, 9, 10, 11, 12])
    assert (rows[0, 4:] == -1).all() and (rows[1, 6:] == -1).all()
    for b in range(2):
        mem = np.concatenate([glob[b, start : start + C], glob[b, np.maximum(rows[b], 0)]])
        np.testing.assert_array_equal(mem[local[b][ids[b] >= 0]], glob[b, ids[b][ids[b] >= 0]])
        np.testing.assert_array_equal(local[b][ids[b] < 0], -1)
    assert [fetch_rows(n, 2056) for n in (0, 1, 16, 17, 256, 257, 2000, 2056)] == [0, 16, 16, 32, 256, 512, 2048, 2056]


def test_offload_with_repeated_reads_matches_device_memory(monkeypatch):
    """Reads of the same chunks by many chunks: batch row 0 repeats a phrase (its later segments read
    mostly earlier copies, on the host, each several times), row 1 is random. With the chunk memory on
    the host (each chunk fetched once, reads remapped) the logits are those of the memory on the device,
    over three prefill segments and then decode steps that close chunks."""
    from drt_jax.inference import offload

    cfg, params, _, _, _ = _setup("rope")  # two retrieval groups
    rng = np.random.default_rng(3)
    n = cfg.chunk_size * 20 + 5
    repeated = np.tile(rng.integers(0, 256, 2 * cfg.chunk_size), 11)[:n]
    tokens = np.stack([repeated, rng.integers(0, 256, n)]).astype(np.int32)  # row 1: no repeats
    kw = dict(batch_size=B, max_chunks=32, memory_block=32, segment_chunks=6)
    plans = []
    plan_reads = offload.plan_reads

    def spy(ids, start, C, cap):
        rows, local = plan_reads(ids, start, C, cap)
        plans.append((ids, start, rows))
        return rows, local

    monkeypatch.setattr(offload, "plan_reads", spy)
    prompt = 3 * 6 * cfg.chunk_size + 3  # three segments of 6 chunks, then decode steps
    got = _teacher_forced(InferenceEngine(cfg, params, offload="host", **kw), tokens, prompt)
    want = _teacher_forced(InferenceEngine(cfg, params, **kw), tokens, prompt)
    np.testing.assert_array_less(np.abs(got - want).max(), 1e-5)
    # What the segments read: host chunks many times over (each fetched once), their own chunks, and
    # batch rows that fetch different numbers of chunks (padded to the same count).
    assert len(plans) == 3 * len(cfg.groups)
    later = [(ids, start, rows) for ids, start, rows in plans if start > 0]
    host_reads = sum(int(((ids >= 0) & (ids < start)).sum()) for ids, start, _ in later)
    fetched = sum(int((rows >= 0).sum()) for _, _, rows in later)
    assert fetched < host_reads / 2, (fetched, host_reads)
    assert all((ids >= start).any() for ids, start, _ in plans)
    assert any((rows[0] >= 0).sum() != (rows[1] >= 0).sum() for _, _, rows in later)
    # GCA decides the logits here: reading nothing moves them by far more than the tolerance.
    blind = _teacher_forced(InferenceEngine(cfg, _without_gca(params), **kw), tokens, prompt)
    assert np.abs(blind - want).max() > 1e-2


def test_chunk_memory_that_cannot_fit_the_device_is_a_one_line_error(monkeypatch):
    from drt_jax.inference import InferenceError, memory

    cfg, params, tokens, ref, eng = _setup("rope")
    st = eng.init_state()
    dev_bytes = memory.device_bytes(cfg, B, 16, offload=False)
    # The estimate is what the state's memory arrays hold.
    assert dev_bytes == sum(x.nbytes for x in (st.dev.mem_lmk, st.dev.mem_k, st.dev.mem_v))
    monkeypatch.setattr(memory, "device_free_bytes", lambda: dev_bytes - 1)
    with pytest.raises(InferenceError, match=r"needs .* GiB on the device.*offload='host'"):
        eng.init_state()
    # Growing checks the new capacity too, before anything is allocated.
    monkeypatch.setattr(memory, "device_free_bytes", lambda: 2 * dev_bytes - 1)
    with pytest.raises(InferenceError, match="32 chunks"):
        eng.ensure_capacity(st, 17)
    # Offloaded, only the landmark keys live on the device: the same budget holds 16x more chunks.
    off = InferenceEngine(cfg, params, batch_size=B, max_chunks=256, memory_block=16, offload="host")
    assert off.init_state().host.k.shape[1] == 256


def test_host_memory_refuses_rows_past_its_capacity():
    """A write past the end raises: numpy would broadcast a one-row block into the empty slice and drop it."""
    from drt_jax.inference.offload import HostMemory

    host = HostMemory.zeros((1, 2, 4, 1, 8), "float32")
    rows = np.ones((1, 1, 4, 1, 8), np.float32)
    host.write(1, rows, rows)
    np.testing.assert_array_equal(host.k[:, 1], rows[:, 0])
    for start in (2, -1):
        with pytest.raises(IndexError, match="outside the host memory's 2 rows"):
            host.write(start, rows, rows)
    with pytest.raises(IndexError):
        host.write_async(2, jnp.asarray(rows), jnp.asarray(rows))
