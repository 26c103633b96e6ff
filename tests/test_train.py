"""Trainer tests on CPU with a small DRT: loss falls, run folder, resume equivalence, load_for_eval,
a mismatched checkpoint, the optimizer schedule and the FLOP count."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import jax
import numpy as np
import pytest

from drt_jax.config import ModelConfig
from drt_jax.train.checkpoints import CheckpointError, load_for_eval
from drt_jax.train.config import OptimConfig
from drt_jax.train.loop import train
from tests.train_fixtures import (
    STEPS,
    assert_one_line_error,
    config_file,
    enable_compilation_cache,
    run_cli,
    small_run,
    write_corpus,
)


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache():
    enable_compilation_cache()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One straight 30-step run (grad_accum=2, dropout) on a corpus that also holds a non-UTF-8 file and
    documents shorter than a chunk; its batches are recorded for the resume test."""
    tmp = tmp_path_factory.mktemp("train")
    extra = {"bad_bytes.txt": b"caf\xe9 \xff\xfe broken " * 20, "short1.txt": b"ab", "short2.txt": b"xyz\n"}
    corpus = write_corpus(tmp / "corpus", extra=extra)
    run = _run(tmp, corpus)
    records = logging.getLogger("drt_jax")
    handler = _ListHandler()
    records.addHandler(handler)
    seen = []
    try:
        summary = train(run, print_fn=lambda *a: None, batch_hook=lambda s, b: seen.append((s, b["tokens"].copy())))
    finally:
        records.removeHandler(handler)
    return tmp, corpus, run, summary, handler.messages, seen


MIN_DOC_TOKENS = 8  # more than the short documents' 2 and 4 bytes


def _run(tmp, corpus, **kw):
    run = small_run(tmp, corpus, **kw)
    return run.replace(data=dataclasses.replace(run.data, min_doc_tokens=MIN_DOC_TOKENS))


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_loss_falls(trained):
    _, _, _, summary, _, _ = trained
    assert summary.first_loss > 5.0  # ~ln(259) at init
    assert summary.last_loss < summary.first_loss - 1.5, (summary.first_loss, summary.last_loss)
    assert summary.eval_loss is not None and summary.eval_loss < summary.first_loss - 1.0


def test_bad_documents_are_logged_not_fatal(trained):
    _, _, run, summary, messages, _ = trained
    assert summary.end_step == 30
    text = " ".join(messages)
    assert "non-UTF-8" in text, messages
    assert f"skipped 2 documents shorter than min_doc_tokens={MIN_DOC_TOKENS}" in text, messages
    (manifest,) = pathlib.Path(run.data.cache_dir).glob("*/manifest.json")
    shards = json.loads(manifest.read_text())
    # 24 prose documents and the non-UTF-8 one are kept; the two short ones are not.
    assert (shards["documents_read"], shards["skipped_short"], shards["num_docs"], shards["non_utf8"]) == (27, 2, 25, 1), shards


def test_run_folder_and_load_for_eval(trained):
    tmp, _, run, summary, _, _ = trained
    run_dir = run.run_dir
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == 259 and cfg["train"]["steps"] == 30 and cfg["data"]["tokenizer"] == "byte"
    assert (run_dir / "git_commit.txt").read_text().strip()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and any("eval/loss" in r for r in rows)
    assert all(r["train/loss"] > 0 for r in rows if "train/loss" in r)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [20, 30]  # keep 2

    model, params, tok = load_for_eval(run_dir)
    assert isinstance(model, ModelConfig) and model.d_model == 32 and tok == "byte"
    assert params["embed"]["embedding"].shape == (259, 32)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    _, params20, _ = load_for_eval(run_dir, step=20)
    assert not np.allclose(params20["embed"]["embedding"], params["embed"]["embedding"])
    with pytest.raises(CheckpointError, match="not among the checkpoints"):
        load_for_eval(run_dir, step=7)


def test_load_for_eval_errors(tmp_path, trained):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_for_eval(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_for_eval(tmp_path / "empty")
    # A folder with a config but no checkpoint yet.
    _, _, run, _, _, _ = trained
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((run.run_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="checkpoint") as err:
        load_for_eval(partial)
    assert "\n" not in str(err.value)


def test_mismatched_checkpoint_is_one_line_cli_error(trained):
    tmp, corpus, run, _, _, _ = trained
    cfg = config_file(tmp, corpus, steps=40, name="mismatch")
    proc = run_cli(["--config", str(cfg), "--set", "model.mlp_dim=96", f"train.run_dir={run.run_dir}"])
    assert_one_line_error(proc, "model.mlp_dim", "checkpoint has 64")


def test_resume_is_equivalent_to_a_straight_run(trained):
    """2N straight steps == N steps, stop (checkpoint), resume, N steps: same batches, same params."""
    tmp, corpus, straight, _, _, seen_a = trained
    n = STEPS // 2
    resumed = _run(tmp, corpus, name="resumed")
    seen_b = []
    # train.stop_at_step stops the first launch at n (the schedule still runs to train.steps).
    first = dataclasses.replace(resumed, train=dataclasses.replace(resumed.train, stop_at_step=n))
    s1 = train(first, print_fn=lambda *a: None, batch_hook=lambda s, b: seen_b.append((s, b["tokens"].copy())))
    assert s1.end_step == n
    s2 = train(resumed, print_fn=lambda *a: None, batch_hook=lambda s, b: seen_b.append((s, b["tokens"].copy())))
    assert (s2.start_step, s2.end_step) == (n, 2 * n)
    assert [s for s, _ in seen_a] == [s for s, _ in seen_b] == list(range(2 * n))
    for (_, a), (_, b) in zip(seen_a, seen_b, strict=True):
        np.testing.assert_array_equal(a, b)
    _, pa, _ = load_for_eval(straight.run_dir)
    _, pb, _ = load_for_eval(resumed.run_dir)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)


def test_schedule_and_decay_mask():
    import flax.linen as nn

    from drt_jax.train.optim import decay_mask, make_schedule
    from drt_jax.train.step import boxed_param_shapes

    sched = make_schedule(OptimConfig(peak_lr=2e-3, end_lr=4e-4, warmup_fraction=0.02), 1000)
    assert float(sched(0)) == 0.0
    assert abs(float(sched(20)) - 2e-3) < 1e-9
    assert abs(float(sched(10)) - 1e-3) < 1e-9
    assert abs(float(sched(1000)) - 4e-4) < 1e-9 and abs(float(sched(5000)) - 4e-4) < 1e-9
    assert 4e-4 < float(sched(500)) < 2e-3
    params = nn.unbox(boxed_param_shapes(ModelConfig(name="t", d_model=32, n_heads=4, mlp_dim=64, decoder_layers=(1, 1), encoder_layers=1, chunk_size=7, window=16, top_k=2)))
    mask = decay_mask(params)
    assert mask["embed"]["embedding"] is False
    assert mask["final_norm"]["scale"] is False
    assert mask["lower_0"]["mlp"]["up"]["kernel"] is True


def test_flops_count():
    from drt_jax.model import parameter_count
    from drt_jax.train.metrics import train_flops_per_sequence

    full = ModelConfig.from_preset("full-133m")
    swa = ModelConfig.from_preset("swa-133m")
    drt = ModelConfig.from_preset("drt-133m")
    # The 6N rule dominates at short length: within 10% of 6 * N * T (N counts the tied table once).
    n = parameter_count(swa)["total"]
    assert abs(train_flops_per_sequence(swa, 512) / (6 * n * 512) - 1) < 0.1
    # Full attention grows quadratically, the window linearly, DRT linearly.
    f4, f64 = train_flops_per_sequence(full, 4096), train_flops_per_sequence(full, 65536)
    assert f64 / f4 > 16 * 3
    s4, s64 = train_flops_per_sequence(swa, 4096), train_flops_per_sequence(swa, 65536)
    assert abs(s64 / s4 - 16) < 0.5
    d4, d64 = train_flops_per_sequence(drt, 4096), train_flops_per_sequence(drt, 65536)
    assert abs(d64 / d4 - 16) < 0.5


def test_flops_count_by_hand():
    """The FLOP count behind MFU (drt_jax.train.metrics) against a count by hand for one small DRT:
    d 16, 2 heads of 8, 1 key/value head, SwiGLU 32, one lower and one upper layer, one encoder layer,
    chunks of 3, window 5, top-2, vocabulary 50, a sequence of 7 tokens (3 chunks, 12 slots)."""
    from drt_jax.train.metrics import train_flops_per_sequence

    cfg = ModelConfig(vocab_size=50, pad_id=47, eos_id=48, landmark_id=49, d_model=16, n_heads=2, n_kv_heads=1,
                      mlp_dim=32, decoder_layers=(1, 1), encoder_layers=1, chunk_size=3, window=5, top_k=2)
    layer = (16 * 16 * 2 + 16 * 8 * 2) + 3 * 16 * 32  # q, o + k, v; gate, up, down: 768 + 1536
    matmuls = 2 * (2 * layer + 2 * 16 * 16 + 1 * layer) * 12  # decoder, GCA q and o, encoder, over 12 slots
    memory = 2 * (2 * 16 * 8) * 3 * 3  # the encoder's memory k and v, over 3 chunks of 3 tokens
    pairs = (1 + 2 + 3 + 4 + 5 + 6) + 6 * 6  # slot i sees min(i, 5) + 1 slots
    attention = 4 * 16 * 2 * pairs  # 4 * H * Dh per (query, key) pair, two decoder layers
    encoder = 4 * 16 * 1 * 3 * 4 * 4  # one layer, 3 chunks of 4 slots attending to each other
    gca = 4 * 16 * 1 * 12 * 2 * 3  # every slot of the upper layer reads K=2 chunks of S=3 tokens
    head = 2 * 50 * 16 * 7  # the tied output projection, per real token
    forward = matmuls + memory + attention + encoder + gca + head
    assert forward == 208960
    assert train_flops_per_sequence(cfg, 7) == 3 * forward


def test_niah_haystacks_come_from_the_training_split(tmp_path):
    """NIAH fine-tuning examples are built on the run's own training text, never on held-out files
    (they used to read the standard library's .txt files whatever the corpus)."""
    import dataclasses

    from drt_jax.data import ByteTokenizer, prepare_shards
    from drt_jax.data.mixture import _REGISTRY
    from drt_jax.train.loop import register_model_tasks
    from tests.train_fixtures import small_run, write_corpus

    tok = ByteTokenizer()
    corpus = write_corpus(tmp_path / "corpus", n_docs=10, extra={f"marker{i}.txt": f"MARKER{i} ".encode() * 40 for i in range(6)})
    run = small_run(tmp_path, corpus)
    run = run.replace(data=dataclasses.replace(run.data, val_fraction=0.3, mixture=(("niah_single", 1.0),)))
    register_model_tasks(run, tok)
    hay = bytes(_REGISTRY["niah_single"](512, tok, 0).task.haystack.astype(np.uint8).tolist())
    shards = prepare_shards(str(corpus), tok, run.data.cache_dir, progress=False)
    train_ids, val_ids = shards.split(run.data.val_fraction)
    marker = lambda d: bytes(shards.document(int(d)).astype(np.uint8).tolist())[:8]  # b"MARKERi " or prose
    train_markers = [marker(d) for d in train_ids if marker(d).startswith(b"MARKER")]
    val_markers = [marker(d) for d in val_ids if marker(d).startswith(b"MARKER")]
    assert train_markers and val_markers
    assert all(m in hay for m in train_markers) and not any(m in hay for m in val_markers)


def test_niah_mixture_is_registered_for_the_model_chunk_size():
    from drt_jax.data import ByteTokenizer
    from drt_jax.data.mixture import _REGISTRY
    from drt_jax.train.config import load_run_config
    from drt_jax.train.loop import register_model_tasks

    run = load_run_config("tiny", ["data.mixture=(('niah_single',0.5),)"])
    register_model_tasks(run)
    source = _REGISTRY["niah_single"](512, ByteTokenizer(), 0)
    assert source.task.S == run.model.chunk_size == 15  # the import-time default is 63


def test_init_from_and_time_limit(tmp_path):
    """train.init_from starts a new run from another run's newest parameters (a fresh optimizer);
    train.time_limit_s stops a run early with a checkpoint that resumes."""
    import dataclasses

    from drt_jax.config import ConfigError
    from drt_jax.train import mesh as mesh_lib
    from drt_jax.train.loop import _init_params_from
    from drt_jax.train.optim import make_optimizer
    from drt_jax.train.step import init_state, state_spec
    from tests.train_fixtures import enable_compilation_cache, small_run, write_corpus

    enable_compilation_cache()
    corpus = write_corpus(tmp_path / "corpus")
    source = small_run(tmp_path, corpus, steps=4, name="src", eval_every=0)
    train(source, print_fn=lambda *_: None)
    _, want, _ = load_for_eval(source.run_dir)

    tx, _ = make_optimizer(source.optim, 4)
    mesh = mesh_lib.make_mesh(source.mesh)
    spec = state_spec(source.model, tx, mesh, source.mesh.rules)
    state = _init_params_from(init_state(source.model, tx, spec, seed=7), str(source.run_dir), spec, tx)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(float(np.abs(x).max()) == 0 for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0)
    wider = dataclasses.replace(source.model, d_model=64)
    wider_spec = state_spec(wider, tx, mesh, source.mesh.rules)
    with pytest.raises(ConfigError, match="init_from"):
        _init_params_from(init_state(wider, tx, wider_spec, seed=0), str(source.run_dir), wider_spec, tx)

    printed = []
    limited = small_run(tmp_path, corpus, steps=1000, name="limited", eval_every=0, time_limit_s=1e-3)
    summary = train(limited, print_fn=printed.append)
    assert summary.end_step < 1000 and any("time_limit_s" in line for line in printed)
    assert load_for_eval(limited.run_dir)[0] == limited.model  # the stop left a readable checkpoint


def test_remat_auto_trains_with_the_least_recomputation_that_fits(tmp_path, monkeypatch):
    """remat="auto" compiles the step with each policy in turn and trains with the first whose allocation
    fits the free memory: given room only for full's step, a run picks full and trains with that
    compiled step (its loss equals a remat=full run's); with room for none it picks none; with room
    for nothing it is a one-line ConfigError; a device that reports no limit trains with none.

    XLA's memory analysis of this small step on a CPU is not bound by the layers' activations (none and
    full allocate the same), so the policies' sizes are modelled: a step with checkpointed layers needs
    a third of one without. That remat does drop the layers' residuals is checked at the JAX level."""
    import drt_jax.train.step as step_module
    from drt_jax.config import ConfigError
    from drt_jax.train import mesh as mesh_lib
    from drt_jax.train.optim import make_optimizer
    from drt_jax.train.step import make_train_step, resolve_remat, state_spec

    corpus = write_corpus(tmp_path / "corpus")
    base = small_run(tmp_path, corpus, steps=3, eval_every=0, grad_accum=1)
    base = base.replace(model=base.model.replace(remat="auto", dropout_rate=0.0))
    monkeypatch.setattr(step_module, "REMAT_SEARCH", ("none", "full"))
    need = {"none": 3 << 20, "full": 1 << 20}
    monkeypatch.setattr(step_module, "step_bytes",
                        lambda compiled: need["full" if "checkpoint" in compiled.as_text() else "none"])
    tx, schedule = make_optimizer(base.optim, 3)
    mesh = mesh_lib.make_mesh(base.mesh)
    spec = state_spec(base.model, tx, mesh, base.mesh.rules)
    bsh = mesh_lib.batch_sharding(mesh, base.mesh.rules)
    build = lambda cfg: make_train_step(cfg, tx, schedule, spec, bsh, grad_accum=1, block_size=0)  # noqa: E731
    batch = {k: jax.ShapeDtypeStruct((4, 64), np.int32, sharding=bsh) for k in ("tokens", "mask")}

    free_for = lambda policy: int(need[policy] / step_module.STEP_MEMORY_SHARE) + 1  # noqa: E731
    for policy in ("none", "full"):
        cfg, _ = resolve_remat(base.model, build, (spec.abstract, batch), free_bytes=free_for(policy), say=lambda *_: None)
        assert cfg.remat == policy
    with pytest.raises(ConfigError, match="does not fit.*lower train.batch"):
        resolve_remat(base.model, build, (spec.abstract, batch), free_bytes=need["full"] // 2, say=lambda *_: None)
    monkeypatch.setattr(step_module, "device_free_bytes", lambda: None)
    assert resolve_remat(base.model, build, (spec.abstract, batch), say=lambda *_: None)[0].remat == "none"

    monkeypatch.setattr(step_module, "device_free_bytes", lambda: free_for("full"))
    printed = []
    auto = train(base.replace(train=dataclasses.replace(base.train, run_dir=str(tmp_path / "auto"))), print_fn=printed.append)
    assert any("remat auto: full" in line for line in printed), printed
    full = train(base.replace(model=base.model.replace(remat="full"),
                              train=dataclasses.replace(base.train, run_dir=str(tmp_path / "full"))), print_fn=lambda *_: None)
    assert auto.last_loss == pytest.approx(full.last_loss, rel=1e-5)
    monkeypatch.setattr(step_module, "step_bytes", lambda compiled: None)  # no memory analysis: none, no crash
    assert resolve_remat(base.model, build, (spec.abstract, batch), free_bytes=1, say=lambda *_: None)[0].remat == "none"


def test_remat_drops_the_layers_residuals_with_the_swiglu_gradient():
    """Under remat="full" the backward keeps a fraction of the residuals it keeps without remat: the MLP's
    custom-gradient SwiGLU is recomputed with its layer like the rest (saved residuals counted by JAX)."""
    import contextlib
    import io
    import re

    import jax.numpy as jnp
    from flax import linen as nn
    from jax.ad_checkpoint import print_saved_residuals

    from drt_jax import DRT
    from drt_jax.losses import next_token_loss

    cfg = ModelConfig.from_preset("tiny")
    tokens = jnp.ones((2, 256), jnp.int32)
    params = jax.eval_shape(lambda: DRT(cfg).init(jax.random.PRNGKey(0), tokens)["params"])  # remat keeps the params

    def residual_bytes(remat):
        model = DRT(cfg.replace(remat=remat))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(lambda p: next_token_loss(model.apply({"params": p}, tokens), tokens, cfg.pad_id)[0],
                                  nn.unbox(params))
        sizes = [np.prod([int(d) for d in dims.split(",") if d]) * 4
                 for dims in re.findall(r"^\s*f32\[([\d,]*)\]", out.getvalue(), re.M)]
        return sum(sizes)

    assert residual_bytes("full") < residual_bytes("none") / 4


def test_the_trainer_passes_loss_logits_dtype_to_its_train_and_eval_steps(tmp_path, monkeypatch):
    """train.loss_logits_dtype reaches the blocked cross-entropy of the train step and of the held-out
    evaluation (float32 unless set)."""
    import drt_jax.train.step as step_module

    seen = []
    real = step_module.blocked_cross_entropy

    def recording(*args, logits_dtype="float32", **kw):
        seen.append(logits_dtype)
        return real(*args, logits_dtype=logits_dtype, **kw)

    monkeypatch.setattr(step_module, "blocked_cross_entropy", recording)
    corpus = write_corpus(tmp_path / "corpus")
    base = small_run(tmp_path, corpus, steps=2, eval_every=0, grad_accum=1)
    assert base.train.loss_logits_dtype == "float32"
    for dtype in ("bfloat16", "float32"):
        seen.clear()
        run = base.replace(train=dataclasses.replace(base.train, loss_logits_dtype=dtype, run_dir=str(tmp_path / dtype)))
        summary = train(run, print_fn=lambda *_: None)
        assert np.isfinite(summary.last_loss)
        assert len(seen) >= 2 and set(seen) == {dtype}, seen  # traced by the train step and the eval step


def test_remat_auto_says_when_a_larger_jax_pool_would_fit_the_step_without_remat(monkeypatch):
    """On a GPU with JAX's default 75% pool, a step without remat that would fit a 95% pool is named with
    the setting that gives it room; not when the setting is already made, not on CPU, not when even the
    larger pool is too small."""
    from drt_jax.train import step as step_module

    class Device:
        def memory_stats(self):
            return {"bytes_limit": 60 * 2**30}

    monkeypatch.setattr(step_module.jax, "devices", lambda: [Device()])
    gib = 2**30
    hint = step_module.pool_hint(55 * gib, 58 * gib, env={}, backend="gpu")  # 58 + 16 GiB more at 95%: 62.9 fit
    assert hint == ("; none needs 55.00 GiB, which fits if JAX may take more of the GPU: "
                    "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (JAX takes 75% by default)")
    assert step_module.pool_hint(64 * gib, 58 * gib, env={}, backend="gpu") == ""
    assert step_module.pool_hint(55 * gib, 58 * gib, env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}, backend="gpu") == ""
    assert step_module.pool_hint(55 * gib, 58 * gib, env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, backend="gpu") == ""
    assert step_module.pool_hint(55 * gib, 58 * gib, env={}, backend="cpu") == ""
