"""Retrieval diagnostics: needle-chunk recall of the answer's retrieval and the weight it gives the
needle, losses on subsets of tokens, and the train step / eval.py reporting them."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax.diagnostics import answer_retrieval_row, chunk_recall, chunk_weight, needle_stats, trailing_share
from drt_jax.losses import blocked_cross_entropy, cross_entropy, next_token_targets


def _marks(T, positions):
    x = np.zeros((1, T), np.int32)
    x[0, list(positions)] = 1
    return jnp.asarray(x)


def test_recall_reads_the_row_that_serves_the_answer_chunk():
    S, T, C, K = 4, 24, 6, 2  # chunks of 4 tokens
    answer = _marks(T, [21, 22])  # first answer token 21 is predicted at 20, in chunk 5: row 4 serves it
    needle = _marks(T, [5, 6, 9])  # needle tokens in chunks 1 and 2
    assert int(answer_retrieval_row(answer, S)[0]) == 4
    indices = -jnp.ones((1, C, K), jnp.int32)
    full = indices.at[0, 4].set(jnp.array([2, 1]))
    half = indices.at[0, 4].set(jnp.array([1, -1]))
    wrong_row = indices.at[0, 3].set(jnp.array([2, 1]))
    for idx, want in [(full, 1.0), (half, 0.5), (wrong_row, 0.0)]:
        recall, _, valid = needle_stats(idx, None, answer, needle, S)
        assert bool(valid[0]) and float(recall[0]) == want
    # Rows without an answer or a needle are not counted.
    _, _, valid = needle_stats(full, None, jnp.zeros_like(answer), needle, S)
    assert not bool(valid[0])
    assert chunk_recall([2, 7, -1], [1, 2]) == 0.5
    # The weight of the same row's slots that hold needle chunks (1 and 2): chunk 3 is not one, an
    # empty slot counts nothing, and another row's weights are not read.
    idx = indices.at[0, 4].set(jnp.array([3, 2])).at[0, 3].set(jnp.array([1, 2]))
    w = jnp.zeros((1, C, K)).at[0, 4].set(jnp.array([0.75, 0.25])).at[0, 3].set(jnp.array([0.5, 0.5]))
    _, weight, valid = needle_stats(idx, w, answer, needle, S)
    assert bool(valid[0]) and float(weight[0]) == 0.25
    _, weight, _ = needle_stats(half, w.at[0, 4].set(jnp.array([0.6, 0.4])), answer, needle, S)
    assert float(weight[0]) == pytest.approx(0.6)
    _, weight, valid = needle_stats(idx, w, answer, jnp.zeros_like(needle), S)
    assert not bool(valid[0]) and float(weight[0]) == 0.0


def test_answer_record_weighs_needle_and_distractor_chunks():
    """A retrieval of chunks 5 (a distractor's) and 9 (the needle's) and an empty slot: each group's
    needle and distractor weight is the weight of its own slots, whatever their order in the retrieval."""
    from drt_jax.evaluate.niah import _answer_record

    answer, values = np.array([7, 8]), [np.array([3, 4])]
    retrieved = np.array([[5, 9, -1], [9, 5, -1], [-1, -1, -1]])
    weights = np.array([[0.7, 0.3, 0.0], [0.875, 0.125, 0.0], [0.0, 0.0, 0.0]], np.float32)
    rec = _answer_record(answer, np.array([3, 4]), 1.5, retrieved, weights, np.array([9]), (np.array([5]), values))
    assert rec["needle_weight"] == {"g0": 0.3, "g1": 0.875, "g2": 0.0}
    assert rec["distractor_weight"] == {"g0": 0.7, "g1": 0.125, "g2": 0.0}
    assert rec["recall"] == rec["distractor_recall"] == {"g0": 1.0, "g1": 1.0, "g2": 0.0}
    assert rec["answered_distractor"] and not rec["correct"]
    # Without distractors, no distractor fields; without retrieval (G = 0), empty tables.
    plain = _answer_record(answer, answer, 0.5, retrieved[:1], weights[:1], np.array([5, 9]))
    assert plain["needle_weight"] == {"g0": 1.0} and "distractor_weight" not in plain
    none = _answer_record(answer, answer, 0.5, np.zeros((0, 0), np.int32), np.zeros((0, 0)), np.array([9]))
    assert none["needle_weight"] == none["recall"] == {}
    # Like recall, the weight is undefined without needle chunks.
    assert np.isnan(chunk_weight([5, 9], [0.5, 0.5], []))


def test_trailing_slots_count_the_chunks_just_after_a_needle_or_distractor():
    """Chunks 11 and 12 follow the needle's chunk 9 within a span of 3, and 7 follows the distractor's 5;
    40 follows neither, 6 is a distractor's own chunk, and an empty slot is not a slot."""
    from drt_jax.config import ModelConfig
    from drt_jax.evaluate.niah import _answer_record, trailing_span

    answer, values = np.array([7, 8]), [np.array([3, 4]), np.array([1, 2])]
    retrieved = np.array([[9, 11, 12, 40, -1], [5, 6, 7, 9, 40]])
    weights = np.full((2, 5), 0.2, np.float32)
    rec = _answer_record(answer, answer, 0.1, retrieved, weights, np.array([9]), (np.array([5, 6]), values), span=3)
    assert rec["trailing_slots"] == {"g0": 0.5, "g1": 0.2}
    narrow = _answer_record(answer, answer, 0.1, retrieved, weights, np.array([9]), (np.array([5, 6]), values), span=1)
    assert narrow["trailing_slots"] == {"g0": 0.0, "g1": 0.2}
    assert np.isnan(trailing_share([-1, -1], [9], 3)) and np.isnan(trailing_share([9, 10], [], 3))
    # drt-20m's 256-slot window over chunks of 64 slots reaches 3 chunks past a needle's.
    cfg = ModelConfig.from_preset("tiny")
    assert trailing_span(dataclasses.replace(cfg, window=256, chunk_size=63)) == 3
    assert trailing_span(dataclasses.replace(cfg, window=64, chunk_size=63)) == 0


def test_blocked_cross_entropy_sums_per_metric_mask():
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    hidden = jax.random.normal(keys[0], (2, 21, 8))
    emb = jax.random.normal(keys[1], (30, 8))
    tokens = jax.random.randint(keys[2], (2, 21), 1, 30)
    targets, mask = next_token_targets(tokens, pad_id=0)
    subset = (jax.random.uniform(keys[3], mask.shape) < 0.3).astype(jnp.float32) * mask
    weights = mask + 4.0 * subset
    logits = jnp.einsum("btd,vd->btv", hidden, emb)
    per_token = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    mean, count, sums = blocked_cross_entropy(hidden, emb, targets, weights, block_size=8,
                                              metric_masks=jnp.stack([mask, subset]))
    np.testing.assert_allclose(count, weights.sum())
    np.testing.assert_allclose(mean, (per_token * weights).sum() / weights.sum(), rtol=1e-5)
    np.testing.assert_allclose(sums, [(per_token * mask).sum(), (per_token * subset).sum()], rtol=1e-5)
    np.testing.assert_allclose(cross_entropy(logits, targets, mask)[0], sums[0] / mask.sum(), rtol=1e-5)


def test_train_reports_corpus_and_answer_loss_and_recall(tmp_path):
    from drt_jax.train.loop import train
    from tests.train_fixtures import enable_compilation_cache, small_run, write_corpus

    enable_compilation_cache()
    corpus = write_corpus(tmp_path / "corpus")
    run = small_run(tmp_path, corpus, steps=4, log_every=2, eval_every=0, grad_accum=2)
    run = run.replace(data=dataclasses.replace(run.data, seq_len=256, mixture=(("niah_single", 0.8), ("copy", 0.2))))
    train(run, print_fn=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train/answer_loss" in r][-1]
    assert set(last) >= {"train/corpus_loss", "train/answer_loss", "train/recall_g0", "train/needle_weight_g0",
                         "train/answer_loss/niah_single", "train/recall_g0/niah_single"}
    # Each task's answer loss where it had rows; recall only where a task has needles (copy has none).
    assert any("train/answer_loss/copy" in r for r in rows)
    assert not any("train/recall_g0/copy" in r for r in rows)
    # Random bytes: the untrained answer loss is near ln 256; recall and weight are fractions.
    assert 4.0 < last["train/answer_loss"] < 8.0 and 0.0 <= last["train/recall_g0"] <= 1.0
    assert 0.0 <= last["train/needle_weight_g0"] <= 1.0


def test_eval_answer_loss_and_recall_match_the_full_forward():
    """The engine's teacher-forced answer loss and the retrieval (chunks and weights) it reports for the
    answer's chunk equal what one full forward pass over prompt + answer gives."""
    from drt_jax.config import ModelConfig
    from drt_jax.data import ByteTokenizer
    from drt_jax.evaluate.niah import answer_diagnostics
    from drt_jax.inference import InferenceEngine
    from drt_jax.model import DRT
    from drt_jax.tasks.niah import NiahTask

    cfg = ModelConfig.from_preset("tiny")
    hay = np.frombuffer(b"def f(x):\n    return x + 1\n" * 200, np.uint8).astype(np.int32)
    samples = [NiahTask("single", ByteTokenizer(), hay, cfg.chunk_size, seed=s, align="chunk").sample(300, 0.3, s)
               for s in range(2)]
    model = DRT(cfg)
    params = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 32), jnp.int32))["params"]
    prompts = np.stack([s.tokens[: s.prompt_len] for s in samples])
    answers = np.stack([s.answer for s in samples])
    eng = InferenceEngine(cfg, params, batch_size=2, max_chunks=40)
    generated, loss, retrieved, weights = answer_diagnostics(eng, prompts, answers)

    full = jnp.asarray(np.concatenate([prompts, answers], axis=1))
    logits, state = model.apply({"params": params}, full, mutable=["intermediates"])
    P, A = prompts.shape[1], answers.shape[1]
    logp = jax.nn.log_softmax(logits[:, P - 1 : P + A - 1].astype(jnp.float32), -1)
    want = -np.take_along_axis(np.asarray(logp), answers[..., None], -1)[..., 0].mean(1)
    np.testing.assert_allclose(loss, want, rtol=1e-4)
    # Greedy decoding by full forward passes: each step feeds back the model's own previous token. The
    # sequence is padded to one length (the model is causal), so this compiles once.
    greedy = np.zeros_like(answers)
    forward = jax.jit(lambda t: model.apply({"params": params}, t))
    for i in range(A):
        seq = np.concatenate([prompts, greedy[:, :i], np.zeros((2, A - i), np.int32)], axis=1)
        greedy[:, i] = np.argmax(np.asarray(forward(jnp.asarray(seq))[:, P - 1 + i]), -1)
    np.testing.assert_array_equal(generated, greedy)
    # Fed the true answer instead, the loop would produce these: they differ, so the check above can tell.
    teacher_forced = np.argmax(np.asarray(logits[:, P - 1 : P + A - 1]), -1)
    assert np.any(teacher_forced[:, 1:] != greedy[:, 1:])
    row = (P - 1) // cfg.chunk_size - 1
    for g in range(len(cfg.groups)):
        full_idx = np.asarray(state["intermediates"][f"retrieval_indices_g{g}"][0])[:, row]
        np.testing.assert_array_equal(retrieved[g], full_idx)
        full_w = np.asarray(state["intermediates"][f"retrieval_weights_g{g}"][0])[:, row]
        np.testing.assert_allclose(weights[g], full_w, rtol=1e-5, atol=1e-6)
        # A softmax over the filled slots (GCA's off-by-one is within each chunk, not across them).
        np.testing.assert_allclose(weights[g].sum(-1), 1.0, rtol=1e-5)


def test_train_step_recall_is_the_retrieval_of_the_answers_chunk():
    """The train step's recall sums equal needle-chunk recall recomputed from a forward pass of the same
    parameters: per example, the chunks holding needle tokens that the retrieval row serving the first
    answer token's chunk selected. No dropout or Gumbel noise, so the step retrieves what that pass does."""
    from drt_jax.model import DRT
    from drt_jax.train import step as step_lib

    env = _StepEnv()
    cfg, S = env.cfg, env.cfg.chunk_size
    task = env.task("multi", seed=1)
    rows = [task.example(env.T, i) for i in range(4)]
    batch = {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in ("tokens", "mask", "answer", "needle")}

    state = step_lib.init_state(cfg, env.tx, env.spec, seed=0)
    params = jax.device_get(state["params"])
    diag = env.diagnostics(state, batch, ())

    _, inter = DRT(cfg).apply({"params": params}, jnp.asarray(batch["tokens"]), mutable=["intermediates"])
    recalls = []
    for g in range(len(cfg.groups)):
        indices = np.asarray(inter["intermediates"][f"retrieval_indices_g{g}"][0])
        weights = np.asarray(inter["intermediates"][f"retrieval_weights_g{g}"][0])
        per_example, per_example_w = [], []
        for b in range(len(rows)):
            first_answer = int(np.flatnonzero(batch["answer"][b])[0])
            row = (first_answer - 1) // S - 1
            needle_chunks = np.unique(np.flatnonzero(batch["needle"][b]) // S)
            per_example.append(np.isin(needle_chunks, indices[b, row]).mean())
            per_example_w.append(weights[b, row][np.isin(indices[b, row], needle_chunks)].sum())
        assert diag[f"recall_g{g}_count"] == diag[f"needle_weight_g{g}_count"] == len(rows)
        np.testing.assert_allclose(diag[f"recall_g{g}_sum"], np.sum(per_example), rtol=1e-6)
        np.testing.assert_allclose(diag[f"needle_weight_g{g}_sum"], np.sum(per_example_w), rtol=1e-5)
        recalls.append(per_example)
    # Partial recalls that differ between groups: a wrong row or a wrong group would show.
    assert any(0 < r < 1 for r in np.ravel(recalls)) and recalls[0] != recalls[1], recalls


def test_train_step_keeps_answer_loss_and_recall_per_task():
    """With several mixture tasks, the step's per-task sums are the whole batch's sums over that task's
    rows: they add up to the whole, and each equals the loss and recall computed on its rows alone."""
    from drt_jax.train import step as step_lib

    env = _StepEnv()
    multi, single, T = env.task("multi", seed=1), env.task("single", seed=2), env.T
    examples = [multi.example(T, 0), single.example(T, 0), multi.example(T, 1), single.example(T, 1)]
    task_of_row = [1, 2, 1, 2]
    batch = {k: np.stack([e[k] for e in examples]).astype(np.int32) for k in ("tokens", "mask", "answer", "needle")}
    batch["task"] = np.repeat(np.asarray(task_of_row, np.int32)[:, None], T, axis=1)

    def diag_of(rows, tasks):
        state = step_lib.init_state(env.cfg, env.tx, env.spec, seed=0)  # the step donates it
        return env.diagnostics(state, {k: v[rows] for k, v in batch.items()}, tasks)

    both = diag_of([0, 1, 2, 3], ("niah_multi", "niah_single"))
    means = step_lib.diagnostic_means(both)
    assert {"answer_loss/niah_multi", "answer_loss/niah_single", "recall_g1/niah_multi",
            "needle_weight_g0/niah_single"} <= set(means)
    for key in ("answer_loss_sum", "answer_tokens", "recall_g0_sum", "recall_g1_count", "needle_weight_g1_sum"):
        np.testing.assert_allclose(both[f"niah_multi/{key}"] + both[f"niah_single/{key}"], both[key], rtol=1e-5)
    # One task's rows alone (no per-task split with a single task): the same sums.
    for name, rows in (("niah_multi", [0, 2]), ("niah_single", [1, 3])):
        alone = diag_of(rows, (name,))
        assert not any("/" in k for k in alone)
        for key in ("answer_loss_sum", "answer_tokens", "recall_g0_sum", "recall_g0_count", "needle_weight_g1_sum"):
            np.testing.assert_allclose(both[f"{name}/{key}"], alone[key], rtol=2e-4, atol=1e-5)
    assert means["answer_loss/niah_multi"] != means["answer_loss/niah_single"]
    # A task named twice in the mixture is one task: all of its rows count.
    twice = diag_of([0, 1, 2, 3], ("niah_multi", "niah_multi"))
    np.testing.assert_allclose(twice["niah_multi/answer_tokens"], both["answer_tokens"])


def test_diagnostic_means_names_each_task():
    sums = {"corpus_loss_sum": 6.0, "corpus_tokens": 3.0, "answer_loss_sum": 4.0, "answer_tokens": 4.0,
            "a/answer_loss_sum": 1.0, "a/answer_tokens": 1.0, "b/answer_loss_sum": 3.0, "b/answer_tokens": 3.0,
            "recall_g0_sum": 1.0, "recall_g0_count": 2.0, "a/recall_g0_sum": 1.0, "a/recall_g0_count": 1.0,
            "b/recall_g0_sum": 0.0, "b/recall_g0_count": 0.0}
    from drt_jax.train.step import diagnostic_means

    assert diagnostic_means(sums) == {"corpus_loss": 2.0, "answer_loss": 1.0, "answer_loss/a": 1.0,
                                      "answer_loss/b": 1.0, "recall_g0": 0.5, "recall_g0/a": 1.0}


class _StepEnv:
    """The train step of a small deterministic DRT (no dropout, no Gumbel noise) on one device, and NIAH
    examples of T tokens for it."""

    T = 448

    def __init__(self):
        from drt_jax.config import ModelConfig
        from drt_jax.train import mesh as mesh_lib
        from drt_jax.train import step as step_lib
        from drt_jax.train.config import DEFAULT_RULES, MeshConfig, OptimConfig
        from drt_jax.train.optim import make_optimizer
        from tests.train_fixtures import SMALL_MODEL

        self.cfg = ModelConfig(**{**SMALL_MODEL, "decoder_layers": (1, 1, 1), "dropout_rate": 0.0, "gumbel_noise": False})
        self.tx, self.sched = make_optimizer(OptimConfig(peak_lr=1e-3, warmup_steps=1), 4)
        mesh = mesh_lib.make_mesh(MeshConfig(), jax.devices()[:1])
        self.spec = step_lib.state_spec(self.cfg, self.tx, mesh, DEFAULT_RULES)
        self.bsh = mesh_lib.batch_sharding(mesh, DEFAULT_RULES)
        self.hay = np.random.default_rng(0).integers(97, 123, 5000).astype(np.int32)

    def task(self, kind: str, seed: int):
        from drt_jax.data import ByteTokenizer
        from drt_jax.tasks.niah import NiahTask

        return NiahTask(kind, ByteTokenizer(), self.hay, self.cfg.chunk_size, seed=seed, align="chunk")

    def diagnostics(self, state, batch: dict, tasks: tuple) -> dict:
        """One step on `batch` (the step donates `state`) -> its diagnostic sums."""
        from drt_jax.train import mesh as mesh_lib
        from drt_jax.train import step as step_lib

        step = step_lib.make_train_step(self.cfg, self.tx, self.sched, self.spec, self.bsh, grad_accum=1, block_size=64,
                                        batch_keys=tuple(batch), tasks=tasks)
        n = len(batch["tokens"])
        return jax.device_get(step(state, mesh_lib.global_batch(batch, self.bsh, n))[1]["diagnostics"])
