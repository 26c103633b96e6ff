"""experiments/: its configs load and validate, and gca_probe measures what it says it measures."""

import dataclasses
import importlib.util
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax.config import ModelConfig
from drt_jax.data import ByteTokenizer
from drt_jax.model import DRT, parameter_count
from drt_jax.tasks.niah import NiahTask
from drt_jax.train.config import load_run_config

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _load(name: str):
    """experiments/<name>.py as a module (registered, so that dataclasses in it can resolve their module)."""
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _probe():
    return _load("gca_probe")


@pytest.mark.parametrize("path", sorted((EXPERIMENTS / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_experiment_configs_load(path):
    run = load_run_config(str(path))
    assert run.name == path.stem
    assert run.data.seq_len <= 16384  # the training-length bound
    assert parameter_count(run.model)["total"] <= 50_000_000  # the model-size bound


def _tiny():
    cfg = ModelConfig.from_preset("tiny").replace(d_model=64, n_heads=4, n_kv_heads=2, mlp_dim=128)
    model = DRT(cfg)
    tokens = np.random.default_rng(0).integers(0, 250, (2, 8 * cfg.chunk_size)).astype(np.int32)
    params = model.init(jax.random.PRNGKey(1), jnp.asarray(tokens))["params"]
    return cfg, model, params, tokens


def test_probe_modes_switch_the_memory_and_restore_it():
    probe = _probe()
    cfg, model, params, tokens = _tiny()
    runs = {}
    for mode in probe.MODES:
        recs = []
        with probe.patched(mode, recs):
            runs[mode] = probe.token_logprobs(model, params, tokens)
        # Only the normal run records; one record per upper layer.
        assert len(recs) == (sum(cfg.groups) if mode == "normal" else 0)
    # The first chunks read no memory (spec 3.5), so only later positions may differ.
    assert not np.allclose(runs["normal"], runs["gca-off"], atol=1e-6)
    assert not np.allclose(runs["normal"], runs["random-ret"], atol=1e-6)
    np.testing.assert_allclose(runs["normal"][:, : cfg.chunk_size], runs["gca-off"][:, : cfg.chunk_size], atol=1e-5)
    # The patches are undone: a plain run equals the normal one.
    np.testing.assert_allclose(probe.token_logprobs(model, params, tokens), runs["normal"], atol=1e-6)


def test_probe_gca_mass_is_the_attention_probability_on_the_key_slot():
    probe = _probe()
    S, H, D = 7, 2, 4
    task = NiahTask("single", ByteTokenizer(), np.arange(97, 123, dtype=np.int32).repeat(40), S, seed=0, align="chunk")
    sample = task.sample(12 * S, 0.0, 0)
    C = 12
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, C, S + 1, H, D)).astype(np.float32)
    k = rng.normal(size=(1, C, S, H, D)).astype(np.float32)
    indices = np.tile(np.arange(8, dtype=np.int32), (1, C, 1))
    weights = np.full((1, C, 8), 0.125, np.float32)
    # Make head 1 of every answer-predicting position look exactly at its passkey token's slot.
    for i, key_pos in enumerate(sample.key_positions):
        c, slot = divmod(sample.prompt_len - 1 + i, S)
        kc, kslot = divmod(key_pos, S)
        q[0, c, slot, 1] = 50.0 * k[0, kc, kslot, 1] / np.linalg.norm(k[0, kc, kslot, 1])
        k[0, kc, kslot, 1] *= 50.0 / np.linalg.norm(k[0, kc, kslot, 1])
    rec = dict(q=q, k=k, indices=indices, weights=weights, off_by_one=True)
    w_needle, w_uniform, mass = probe.gca_stats([rec], [sample], S)
    assert w_needle == pytest.approx(0.125) and w_uniform == pytest.approx(0.125)
    assert mass["layer0"] > 0.99
    # Without the aligned head the best head's mass is an ordinary softmax probability.
    rec["q"] = rng.normal(size=q.shape).astype(np.float32)
    assert 0.0 < probe.gca_stats([rec], [sample], S)[2]["layer0"] < 0.9
    # The needle's share of the output: equal-strength chunks share by weight; silent ones leave it 1.
    rec["v"] = np.ones((1, C, S, H, D), np.float32)
    plain = dict(rec, off_by_one=False)  # every chunk's probabilities sum to 1: equal output norms
    assert probe.needle_share([plain], [sample], S)["layer0"] == pytest.approx(0.125, rel=1e-4)
    rec["v"] = np.zeros((1, C, S, H, D), np.float32)
    rec["v"][0, sample.key_positions[0] // S] = 1.0
    assert probe.needle_share([rec], [sample], S)["layer0"] == pytest.approx(1.0)
    # A needle chunk that was not retrieved gives weight 0 and mass 0.
    rec["indices"] = np.full_like(indices, C - 1)
    w_needle, _, mass = probe.gca_stats([rec], [sample], S)
    assert w_needle == 0.0 and mass["layer0"] == 0.0


@pytest.mark.parametrize("kind", ["single", "2hop"])
def test_probe_copy_sources_pair_each_answer_token_with_its_needle_token(kind):
    """gca_probe --task 2hop: v1's tokens are answer tokens 0-4 and v2's are 7-11 (after "->")."""
    hay = np.arange(97, 123, dtype=np.int32).repeat(40)
    for i in range(3):
        s = NiahTask(kind, ByteTokenizer(), hay, 15, seed=i).sample(900, 0.4, i)
        pairs = _probe().copy_sources(s)
        assert len(pairs) == (5 if kind == "single" else 10)
        for a, pos in pairs:
            assert s.answer[a] == s.tokens[pos] and s.tokens[s.prompt_len + a] == s.answer[a]
        if kind == "2hop":
            assert [a for a, _ in pairs] == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]


def test_probe_retrieval_reach_counts_distances_back():
    probe = _probe()
    cfg = ModelConfig.from_preset("tiny")
    idx = np.array([[[-1, -1], [0, -1], [1, 0], [0, 2]]], np.int32)  # row c is what chunk c reads
    weights = np.array([[[0, 0], [1, 0], [0.25, 0.75], [0.6, 0.4]]], np.float32)
    reach = probe.retrieval_reach([{"indices": idx, "weights": weights}], cfg)
    # distances: 1; 1, 2; 3, 1
    assert reach["mean_distance"] == pytest.approx(8 / 5)
    assert reach["frac_within_window"] == pytest.approx(np.mean(np.array([1, 1, 2, 3, 1]) <= cfg.window // cfg.slots_per_chunk))
    # rows 2 and 3 read both chunks: sorted (0.75, 0.25) and (0.6, 0.4)
    assert reach["weights_sorted_mean"] == pytest.approx([0.675, 0.325])
    assert reach["weight_uniform"] == 0.5
    assert "weights_sorted_mean" not in probe.retrieval_reach([{"indices": idx}], cfg)


def test_probe_noise_against_scores_spans_clean_to_random():
    probe = _probe()
    mats = [np.random.default_rng(0).normal(size=(2, 40, 40)).astype(np.float32)]
    exact = probe.noise_against_scores(mats, 4, 0.0, draws=3)
    assert exact["overlap_noisy_clean"] == 1.0 and exact["noise_std"] == 0.0
    assert exact["score_std"] == pytest.approx(1.0, abs=0.15)
    loud = probe.noise_against_scores(mats, 4, 100.0, draws=3)
    assert loud["overlap_noisy_clean"] == pytest.approx(loud["overlap_random"], abs=0.05)
    mid = probe.noise_against_scores(mats, 4, 1.0, draws=3)
    assert loud["overlap_noisy_clean"] < mid["overlap_noisy_clean"] < 1.0


def _segment(args, cwd):
    import subprocess

    return subprocess.run([sys.executable, str(EXPERIMENTS / "segment.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_segment_runs_a_curriculum_stage_then_the_run_then_the_probe(tmp_path):
    import json
    import tarfile

    runs = tmp_path / "runs"
    out = tmp_path / "out"
    proc = _segment(["--config", "tiny", "--out", str(out), "--budget-s", "300", "--eval-s", "60",
                     "--set", "name=seg", f"train.run_dir={runs}/{{name}}", "train.steps=4", "train.progress_bar=false",
                     "data.seq_len=128", "train.batch=2",
                     "--stage", "60:train.steps=3 data.seq_len=64", "--probe", "128",
                     "--niah", "512", "--niah-task", "2hop", "--depths", "0", "--samples", "1", "--niah-top-k", "2,1",
                     "--ppl", "128", "--ppl-windows", "2"],
                    tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
        segment = json.load(tar.extractfile("seg/segment.json"))
        probe = json.load(tar.extractfile("seg/eval/gca_probe.json"))
        stage_config = json.load(tar.extractfile("seg/stages/seg-stage0/config.json"))
        niah = {k: json.load(tar.extractfile(f"seg/eval/niah_2hop_k{k}.json")) for k in (1, 2)}
        ppl = json.load(tar.extractfile("seg/eval/ppl.json"))
    assert [(r["length"], r["windows"]) for r in ppl["results"]] == [(128, 2)]
    assert {k: (r["top_k"], r["task"]) for k, r in niah.items()} == {1: (1, "2hop"), 2: (2, "2hop")}
    assert "seg/stages/seg-stage0/metrics.jsonl" in names
    assert stage_config["data"]["seq_len"] == 64 and stage_config["train"]["steps"] == 3
    commands = [step["command"] for step in segment["steps"]]
    # The stage trains first; the main run starts from the stage's run folder, then the probe reads it.
    assert "name=seg-stage0" in commands[0]
    assert f"train.init_from={runs}/seg-stage0" in commands[1] and "name=seg-stage0" not in commands[1]
    assert any("gca_probe.py" in c for c in commands)
    assert set(probe) >= {"normal", "gca-off", "random-ret"} and "lm_loss" in probe["normal"]
    assert (out / "bundle" / "manifest.json").is_file()


def test_segment_kills_a_command_at_its_timeout_even_while_it_prints(tmp_path, capsys):
    """A command past its time is killed on time (the eval at 1M that ran past the machine's limit and
    took the segment's logs with it), whether it prints or is silent."""
    import time

    segment = _load("segment")
    timings = []
    for body in ("import time\nfor _ in range(200): print('x', flush=True); time.sleep(0.1)", "import time; time.sleep(20)"):
        with open(tmp_path / "log", "w") as log:
            t0 = time.time()
            rc = segment._run([sys.executable, "-c", body], log, timings, timeout=2)
        assert rc == -9 and time.time() - t0 < 10, (rc, time.time() - t0)
    assert "killed after 2 s" in (tmp_path / "log").read_text()
    with open(tmp_path / "log", "w") as log:
        assert segment._run([sys.executable, "-c", "print('done')"], log, timings, timeout=30) == 0
    assert "done" in capsys.readouterr().out and [t["rc"] for t in timings] == [-9, -9, 0]


def test_segment_rejects_a_malformed_stage(tmp_path):
    proc = _segment(["--config", "tiny", "--out", str(tmp_path / "out"), "--stage", "soon:train.steps=3"], tmp_path)
    assert proc.returncode == 2
    assert "SECONDS:OVERRIDES" in proc.stderr.strip().splitlines()[-1]
    proc = _segment(["--config", "tiny", "--out", str(tmp_path / "out"), "--niah-top-k", "8,x"], tmp_path)
    assert proc.returncode == 2 and "--niah-top-k" in proc.stderr.strip().splitlines()[-1]
    # A bad key in a stage is refused before anything trains.
    proc = _segment(["--config", "tiny", "--out", str(tmp_path / "out"), "--stage", "5:train.stepz=3"], tmp_path)
    assert proc.returncode == 2 and "train.stepz" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_readout_task_puts_the_key_beyond_the_window_and_trains():
    readout = _load("gca_readout")
    tokens = readout.batch(np.random.default_rng(0), 3, 56)
    np.testing.assert_array_equal(tokens[:, 1:5], tokens[:, -4:])
    assert np.all((tokens[:, 1:5] >= 65) & (tokens[:, 1:5] < 91))
    assert np.all(tokens[:, 5:-4] == 97) and np.all(tokens[:, 0] == 97)
    assert not np.array_equal(tokens[0, 1:5], tokens[1, 1:5])  # fresh keys per sequence
    moved = readout.batch(np.random.default_rng(1), 64, 56, random_offset=True)
    starts = [int(np.flatnonzero(row[:-4] != 97)[0]) for row in moved]
    assert len(set(starts)) > 5 and max(starts) + 4 <= 28  # anywhere in the first half
    for row, start in zip(moved, starts, strict=True):
        np.testing.assert_array_equal(row[start:start + 4], row[-4:])
    cfg = ModelConfig.from_preset("tiny").replace(d_model=32, n_heads=2, mlp_dim=64, decoder_layers=(1, 1),
                                                   chunk_size=7, window=8, top_k=2)
    curve, params = readout.train([(cfg, 56, 4)], batch_size=2, lr=1e-3, seed=0, log=2, gumbel=True)
    assert [s for s, _ in curve] == [2, 4] and all(np.isfinite(v) for _, v in curve)
    # A curriculum: the step count runs on across stages of different lengths and top-k.
    curve, _ = readout.train([(cfg.replace(top_k=1), 21, 2), (cfg, 56, 2)], batch_size=2, lr=1e-3, seed=0, log=1,
                          gumbel=False)
    assert [s for s, _ in curve] == [1, 2, 3, 4]
    # The length sweep reads the answer chunk's retrieval: with 3 chunks and top-2 the only visible
    # chunk (0, the key's) holds all the weight; with more chunks it shares it.
    sweep = readout.length_sweep(cfg, params, [3, 16], batch_size=4, seed=0)
    assert [r["chunks"] for r in sweep] == [3, 16]
    assert sweep[0]["recall"] == 1.0 and abs(sweep[0]["w_needle"] - 1.0) < 1e-6
    assert 0.0 <= sweep[1]["w_needle"] < 1.0 and all(np.isfinite(r["answer_loss"]) for r in sweep)


def test_readout_marker_and_noise_filler():
    readout = _load("gca_readout")
    tokens = readout.batch(np.random.default_rng(0), 64, 56, random_offset=True, marker=True, noise=True)
    for row in tokens:
        marks = np.flatnonzero(row == readout.MARKER)
        assert len(marks) == 2 and marks[1] == 56 - 5  # one before the key, one before the answer
        np.testing.assert_array_equal(row[marks[0] + 1:marks[0] + 5], row[-4:])
    filler = np.delete(tokens[0], np.r_[np.flatnonzero(tokens[0] == readout.MARKER)[0] + np.arange(5), 51:56])
    assert np.all((filler >= 97) & (filler < 123)) and len(set(filler.tolist())) > 5  # random lower case
    fixed = readout.batch(np.random.default_rng(0), 4, 56, marker=True)
    assert np.all(fixed[:, 1] == readout.MARKER) and np.all(fixed[:, 0] == 97)


def test_readout_pairs_task_needs_the_querys_key_matched():
    readout = _load("gca_readout")
    tokens = readout.pairs_batch(np.random.default_rng(0), 64, 28, pairs=2)
    queried = []
    for row in tokens:
        keys = row[[0, 5]]
        assert keys[0] != keys[1] and np.all((row[:10] >= 65) & (row[:10] < 91))
        j = int(np.flatnonzero(keys == row[-5])[0])  # the query's key is one of the row's keys ...
        np.testing.assert_array_equal(row[-4:], row[5 * j + 1:5 * j + 5])  # ... and the answer its value
        queried.append(j)
    assert 0 < sum(queried) < len(queried)  # either pair can be asked for
    np.testing.assert_array_equal(readout.batch(np.random.default_rng(0), 64, 28, pairs=2), tokens)
    with pytest.raises(ValueError, match="do not fit"):
        readout.pairs_batch(np.random.default_rng(0), 1, 28, pairs=3)
    # A stage's own pair count: one-pair warm-up, then two pairs.
    cfg = ModelConfig.from_preset("tiny").replace(d_model=32, n_heads=2, mlp_dim=64, decoder_layers=(1, 1),
                                                   chunk_size=7, window=8, top_k=2)
    seen = []
    real = readout.batch
    try:
        readout.batch = lambda *a, **k: seen.append(k["pairs"] if "pairs" in k else a[6]) or real(*a, **k)
        curve, _ = readout.train([(cfg, 28, 2, 1), (cfg, 28, 2)], batch_size=2, lr=1e-3, seed=0, log=1,
                                 gumbel=False, noise=True, pairs=2)
    finally:
        readout.batch = real
    assert seen[-4:] == [1, 1, 2, 2] and len(curve) == 4


def test_readout_pairs_with_the_query_before_the_answers_chunk():
    readout = _load("gca_readout")
    S = readout.CHUNK_SIZE
    tokens = readout.pairs_batch(np.random.default_rng(0), 64, 5 * S, pairs=3, noise=True, query_before=True)
    start = readout.answer_start(5 * S, True)
    assert start == 4 * S + 1  # the answer fills chunk 4 after its '#' cue ...
    queried = readout.queried_chunk(tokens, 3)
    for row, chunk in zip(tokens, queried, strict=True):
        keys = row[[0, S, 2 * S]]  # ... one pair opens each of chunks 0-2 ...
        assert len(set(keys.tolist())) == 3 and np.all((keys >= 65) & (keys < 91))
        assert row[4 * S - 1] == keys[chunk] and row[4 * S] == readout.MARKER  # ... the key ends chunk 3
        np.testing.assert_array_equal(row[start:start + 4], row[chunk * S + 1:chunk * S + 5])
    assert len(set(queried.tolist())) == 3  # any pair can be asked for
    with pytest.raises(ValueError, match="one per chunk"):
        readout.pairs_batch(np.random.default_rng(0), 1, 4 * S, pairs=3, query_before=True)
    # The probe reads the answer chunk's retrieval weight on the queried chunk: with 2 pairs, 4 chunks
    # and top-2, both pair chunks are fetched, so the weights on them sum to one across the two.
    cfg = ModelConfig.from_preset("tiny").replace(d_model=32, n_heads=2, mlp_dim=64, decoder_layers=(1, 1),
                                                   chunk_size=S, window=8, top_k=2)
    curve, params = readout.train([(cfg, 4 * S, 2)], batch_size=2, lr=1e-3, seed=0, log=1, gumbel=True,
                                  noise=True, pairs=2, query_before=True)
    assert len(curve) == 2 and all(np.isfinite(v) for _, v in curve)
    probe = readout.pairs_probe(cfg, params, 4 * S, 2, batch_size=16, seed=0, noise=True, query_before=True)
    assert 0.0 < probe["w_queried"] < 1.0 and np.isfinite(probe["answer_loss"])
    # Packed pairs share chunks: the probe gives the answer loss alone.
    assert set(readout.pairs_probe(cfg, params, 4 * S, 2, batch_size=4, seed=0, noise=True, query_before=False)) == {"answer_loss"}


def test_readout_smeared_memory_keys_see_the_previous_slot(monkeypatch):
    readout = _load("gca_readout")
    import drt_jax.model as model_module

    monkeypatch.setattr(model_module, "ChunkEncoder", readout.smeared_encoder_class())
    cfg = ModelConfig.from_preset("tiny").replace(d_model=32, n_heads=2, mlp_dim=64, decoder_layers=(1, 1),
                                                   chunk_size=7, window=8, top_k=2)
    tokens = jnp.asarray(readout.batch(np.random.default_rng(0), 2, 56))
    model = DRT(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    assert params["encoder"]["smear"].shape == (cfg.kv_heads,)
    # Moving only the smearing gate changes the output: the smeared keys are used.
    bumped = jax.tree_util.tree_map(lambda x: x, params)
    bumped["encoder"]["smear"] = params["encoder"]["smear"] + 5.0
    assert not np.allclose(model.apply({"params": params}, tokens), model.apply({"params": bumped}, tokens), atol=1e-5)


def test_readout_grad_norms_cover_both_attention_paths():
    readout = _load("gca_readout")
    cfg = ModelConfig.from_preset("tiny").replace(d_model=32, n_heads=2, mlp_dim=64, decoder_layers=(1, 1),
                                                   chunk_size=7, window=8, top_k=8, gumbel_scale=0.0)
    norms = readout.answer_grad_norms(cfg, batch_size=4, T=56, seed=0, random_offset=True)
    assert set(norms) >= {"gca q", "memory k", "upper self-attention q", "lower self-attention k"}
    assert all(np.isfinite(v) and v > 0 for v in norms.values())


def test_probe_refuses_unknown_modes(capsys):
    probe = _probe()
    with pytest.raises(SystemExit) as err:
        probe.main(["--checkpoint", "nowhere", "--modes", "normal,gca-of"])
    assert err.value.code == 2 and "--modes" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--warmup", "4:2"], ["--warmup", "a:b:c"], ["--eval-chunks", "8,x"], ["--eval-chunks", "2"],
                                   ["--pairs", "3", "--chunks", "4"], ["--warmup-pairs", "-1", "--pairs", "1"],
                                   ["--log", "2"], ["--encoder-layers", "-1"], ["--query-before-chunk"],
                                   ["--query-before-chunk", "--pairs", "3", "--chunks", "4"],
                                   ["--warmup-pairs", "3", "--warmup", "4:2:1", "--pairs", "1", "--chunks", "8",
                                    "--query-before-chunk"]])
def test_readout_refuses_bad_curriculum_flags(flags, capsys):
    readout = _load("gca_readout")
    with pytest.raises(SystemExit) as err:
        readout.main(["--steps", "1", "--log", "1", *flags])
    assert err.value.code == 2 and flags[0] in capsys.readouterr().err


def test_plots_merge_joins_niah_results_over_lengths(tmp_path):
    import json

    plots = _load("plots")

    def result(length, acc, depths=(0.0, 1.0)):
        cell = {str(d): acc for d in depths}
        return {"checkpoint": "runs/x", "task": "single", "depths": list(depths), "top_k": 8, "lengths": [length],
                "samples_per_cell": 2, "accuracy": {str(length): cell}, "answer_loss": {str(length): cell},
                "needle_recall": {"g0": {str(length): cell}}, "records": [{"length": length}], "seconds": 1.5}

    paths = []
    for name, r in (("long", result(1 << 24, 0.5)), ("short", result(4096, 1.0)), ("odd", result(8192, 1.0, (0.5,)))):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(r))
    merged = plots.merge_niah([str(paths[0]), str(paths[1])])
    assert merged["lengths"] == [4096, 1 << 24] and len(merged["records"]) == 2 and merged["seconds"] == 3.0
    assert merged["accuracy"] == {"16777216": {"0.0": 0.5, "1.0": 0.5}, "4096": {"0.0": 1.0, "1.0": 1.0}}
    assert set(merged["needle_recall"]["g0"]) == {"4096", "16777216"}
    with pytest.raises(ValueError, match="depths"):
        plots.merge_niah([str(paths[1]), str(paths[2])])
    with pytest.raises(ValueError, match="repeat"):
        plots.merge_niah([str(paths[1]), str(paths[1])])
    conversation = tmp_path / "conversation.json"
    conversation.write_text(json.dumps({**result(65536, 1.0), "task": "conversation"}))
    with pytest.raises(ValueError, match="conversation result, which merge does not join"):
        plots.merge_niah([str(paths[1]), str(conversation)])
    assert plots.main(["merge", str(paths[0]), str(paths[1]), "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["merged_from"] == [str(paths[0]), str(paths[1])]


@pytest.mark.parametrize("pair", [("drt-20m-niah", "swa-20m-niah"), ("drt-20m-lm", "swa-20m-lm")], ids=["niah", "lm"])
def test_swa_baseline_config_sees_the_drt_runs_batches(tmp_path, pair):
    """The baseline configs with a DRT segment's overrides draw the DRT's batches (NIAH and corpus rows
    for the -niah pair, corpus rows only for the -lm pair)."""
    from drt_jax.data import build_train_iterator, load_tokenizer
    from drt_jax.train.loop import register_model_tasks

    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(["alpha", "beta", "gamma", "delta", "x = 1", "def f():"], 12))
                                for _ in range(3000)))
    overrides = [f"data.corpus={corpus}", "data.seq_len=252", "train.batch=4", "data.num_workers=0",
                 f"data.cache_dir={tmp_path / 'cache'}", "model.window=128", "model.top_k=2"]
    batches = {}
    for name in pair:
        run = load_run_config(str(EXPERIMENTS / "configs" / f"{name}.py"), overrides)
        tok = load_tokenizer(run.data.tokenizer)
        register_model_tasks(run, tok)
        it = build_train_iterator(dataclasses.replace(run.data, batch_size=run.train.batch), tok, progress=False)
        batches[run.model.arch] = [next(it) for _ in range(3)]
    for a, b in zip(batches["drt"], batches["swa"], strict=True):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
    if pair[0].endswith("-niah"):  # both NIAH examples (answer tokens marked) and corpus rows were compared
        answers = np.concatenate([np.asarray(b["answer"]).any(axis=1) for b in batches["drt"]])
        assert answers.any() and not answers.all()
    else:  # language modelling alone: no task rows, so no answer marks
        assert "answer" not in batches["drt"][0]


@pytest.mark.parametrize("arch,mixture,answer,says", [
    ("swa", [["niah_single", 0.5]], True, ["no retrieval in this model"]),
    ("drt", [], False, ["no task examples in this run", "no task examples in this run"]),
    (None, None, True, ["no needle recall logged"]),
], ids=["baseline", "drt-lm", "no-config"])
def test_plots_curves_say_why_a_panel_is_empty(tmp_path, monkeypatch, arch, mixture, answer, says):
    """A run without recall (a baseline, or a DRT trained on text alone) still plots, with no empty legend,
    and its empty panels say which of the two it is (from the run's config.json)."""
    import json
    import warnings

    plots = _load("plots")
    axes_cls = plots._plt().Axes
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "train/loss": 1.0 / s, "train/corpus_loss": 1.2 / s,
                                             **({"train/answer_loss": 4.1} if answer else {})}) for s in (1, 25, 50)))
    if arch is not None:
        (tmp_path / "config.json").write_text(json.dumps({"model": {"arch": arch}, "data": {"mixture": mixture}}))
    texts = []
    real_text = axes_cls.text

    def spy(ax, x, y, s, *args, **kwargs):
        texts.append(s)
        return real_text(ax, x, y, s, *args, **kwargs)

    monkeypatch.setattr(axes_cls, "text", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when a legend has nothing to show
        plots.training_curves(str(metrics), str(tmp_path / "c.png"), title=str(arch))
    assert (tmp_path / "c.png").stat().st_size > 0
    assert texts == says


def test_plots_curves_draw_each_task_of_a_mixture(tmp_path, monkeypatch):
    """A mixture's per-task answer loss and recall get a line each, labelled with the task, beside the
    whole batch's."""
    import json

    plots = _load("plots")
    axes_cls = plots._plt().Axes
    rows = [{"step": s, "train/loss": 1.0, "train/answer_loss": 2.0, "train/answer_loss/niah_multi": 3.0,
             "train/answer_loss/niah_single": 1.0, "train/recall_g0": 0.5, "train/recall_g0/niah_multi": 0.2,
             "train/recall_g0/niah_single": 0.8} for s in (1, 50)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    labels = []
    real_plot = axes_cls.plot

    def spy(ax, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return real_plot(ax, *args, **kwargs)

    monkeypatch.setattr(axes_cls, "plot", spy)
    plots.training_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "c.png"))
    assert labels == ["objective (weighted)", "answer tokens", "niah_multi", "niah_single",
                      "recall_g0", "recall_g0/niah_multi", "recall_g0/niah_single"]


def test_plots_ppl_compares_files_at_their_shared_lengths(tmp_path, monkeypatch, capsys):
    """The right panel is each file's perplexity over the baseline's (the first file), at shared lengths."""
    import json

    plots = _load("plots")

    def result(table):
        return {"command": "ppl", "model": "m", "results": [{"length": L, "ppl": v} for L, v in table.items()]}

    base, drt, other = tmp_path / "swa.json", tmp_path / "drt.json", tmp_path / "other.json"
    base.write_text(json.dumps(result({2048: 2.0, 16384: 2.5, 32768: 3.0})))
    drt.write_text(json.dumps(result({2048: 2.2, 16384: 2.0})))
    other.write_text(json.dumps(result({4096: 1.0})))
    lines = []
    real_plot = plots._plt().Axes.plot

    def spy(ax, x, y, *args, **kwargs):
        lines.append((kwargs.get("label"), list(x), [round(v, 6) for v in y]))
        return real_plot(ax, x, y, *args, **kwargs)

    monkeypatch.setattr(plots._plt().Axes, "plot", spy)
    assert plots.main(["ppl", str(base), str(drt), "--labels", "swa,DRT", "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0
    assert ("DRT / swa", [2048, 16384], [1.1, 0.8]) in lines
    assert ("swa", [2048, 16384, 32768], [2.0, 2.5, 3.0]) in lines
    assert not any(label == "swa / swa" for label, _, _ in lines)  # the baseline is the reference line
    with pytest.raises(SystemExit):
        plots.main(["ppl", str(base), str(other), "--out", str(tmp_path / "q.png")])
    assert "share no context length" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plots.main(["ppl", str(tmp_path / "p.png"), "--out", str(tmp_path / "q.png")])
