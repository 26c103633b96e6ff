"""eval.py: one-line errors (exit 2, no traceback) and happy paths on a random tiny model."""

import json
import os
import subprocess
import sys

import pytest

from drt_jax.evaluate.cli import main
from drt_jax.evaluate.common import EvalError, parse_lengths
from drt_jax.evaluate.perplexity import windows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORY = "Once upon a time a little dog named Rex liked to run in the park every morning.\n" * 30


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *args], capture_output=True, text=True,
                          env=env, timeout=240)


@pytest.mark.parametrize(
    "args, message",
    [
        (["ppl", "--checkpoint", "random:tiny", "--lengths", "2Q"], "cannot parse length"),
        (["niah", "--checkpoint", "random:tiny", "--lengths", "40", "--data", "STORY"], "too short"),
        (["generate", "--checkpoint", "random:tiny", "--prompt", ""], "empty prompt"),
        (["niah", "--checkpoint", "random:tiny", "--top-k", "0"], "--top-k 0 must be >= 1"),
        (["generate", "--checkpoint", "/nonexistent/run", "--prompt", "hi"], "does not exist"),
        (["generate", "--checkpoint", "PARTIAL", "--prompt", "hi"], "missing"),
    ],
)
def test_cli_errors_are_one_line(args, message, tmp_path):
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    partial = tmp_path / "run"
    partial.mkdir()
    (partial / "config.json").write_text("{}")  # a run folder without checkpoints
    args = [str(story) if a == "STORY" else str(partial) if a == "PARTIAL" else a for a in args]
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_config_weights_mismatch_is_reported(tmp_path, monkeypatch):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from drt_jax import DRT, ModelConfig
    from drt_jax.evaluate import common

    cfg = ModelConfig.from_preset("tiny")
    params = nn.unbox(DRT(cfg.replace(mlp_dim=128)).init(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32))["params"])
    with pytest.raises(EvalError, match="do not match its config"):
        common._check_params(cfg, params)


def test_lengths_and_windows():
    assert parse_lengths("2K,16K,1M,100") == [2048, 16384, 1 << 20, 100]
    with pytest.raises(EvalError):
        parse_lengths("2K,x")
    # stride in tokens: the first window scores all, later ones the last `stride` tokens
    assert windows(100, 40, 20, None) == [(0, 0), (20, 20), (40, 20)]
    assert windows(100, 40, -1, None) == [(0, 0), (40, 0)]


def _greedy(checkpoint: str, prompt: str, n: int) -> list[int]:
    """n greedy tokens by full forward passes (padded to one length: the model is causal)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from drt_jax import DRT
    from drt_jax.evaluate.common import load_model

    cfg, params, tok = load_model(checkpoint)
    ids = tok.encode(prompt)
    forward = jax.jit(lambda t: DRT(cfg).apply({"params": params}, t))
    out = []
    for _ in range(n):
        seq = np.asarray([ids + out + [0] * (n - len(out))], np.int32)
        out.append(int(jnp.argmax(forward(jnp.asarray(seq))[0, len(ids) + len(out) - 1])))
    assert tok.eos_id not in out  # so the CLI must print all n
    return out


def test_cli_happy_paths(tmp_path, capsys):
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    out = tmp_path / "res"
    assert main(["generate", "--checkpoint", "random:tiny", "--prompt", "Once upon a", "--max-new-tokens", "5",
                 "--out", str(out / "gen.json")]) == 0
    assert json.loads((out / "gen.json").read_text())["tokens"] == _greedy("random:tiny", "Once upon a", 5)
    assert main(["niah", "--checkpoint", "random:tiny", "--task", "single", "--lengths", "150", "--depths", "0,1",
                 "--samples", "2", "--batch-size", "2", "--data", str(story), "--out", str(out / "new" / "niah.json")]) == 0
    res = json.loads((out / "new" / "niah.json").read_text())  # a folder that did not exist: the heatmap goes there too
    assert set(res["accuracy"]["150"]) == {"0.0", "1.0"} and os.path.getsize(res["plot"]) > 1000
    # Diagnostics per cell and per sample: teacher-forced answer loss, needle-chunk recall per group.
    assert set(res["needle_recall"]) == {"g0", "g1"} and res["answer_loss"]["150"]["0.0"] > 1.0
    rec = res["records"][0]
    assert {"answer_loss", "needle_chunks", "retrieved", "recall"} <= set(rec) and len(rec["retrieved"]["g0"]) == 4
    # The weight the needle's chunks got: a share of the retrieval's softmax, none where none was fetched.
    for r in res["records"]:
        assert set(r["needle_weight"]) == {"g0", "g1"}
        for g, w in r["needle_weight"].items():
            assert 0.0 <= w <= 1.0 and (w == 0.0 or r["recall"][g] > 0), (g, w, r["recall"])
    cell = [r["needle_weight"]["g1"] for r in res["records"] if r["depth"] == 0.0]
    assert set(res["needle_weight"]) == {"g0", "g1"} and res["needle_weight"]["g1"]["150"]["0.0"] == pytest.approx(
        sum(cell) / len(cell))
    # Random offsets by default (a batch of 2 holds prompts of one length); the breakdown by offset
    # bucket, recomputed by hand from the records with tiny's S = 15 (buckets 0, 1-3, 4-11, 12-14).
    assert res["align"] == "random" and res["offset_buckets"] == ["0", "1-3", "4-11", "12-14"]
    assert [r["offset"] for r in res["records"]] != [0] * 4 and all(0 <= r["offset"] < 15 for r in res["records"])
    assert res["by_offset"] == _by_offset_by_hand(res["records"], {"0": (0, 1), "1-3": (1, 4), "4-11": (4, 12),
                                                                   "12-14": (12, 15)}, ["150", "all"])
    printed = capsys.readouterr().out
    assert "by the question's offset in its chunk of 15 tokens (random layout)" in printed
    for r in res["records"]:
        assert any(line.split()[:2] == ["150", _bucket(r["offset"])] for line in printed.splitlines())
    assert main(["niah", "--checkpoint", "random:tiny", "--task", "2hop", "--lengths", "200", "--depths", "0.5",
                 "--samples", "2", "--batch-size", "2", "--align", "chunk", "--data", str(story),
                 "--out", str(out / "aligned.json")]) == 0
    aligned = json.loads((out / "aligned.json").read_text())
    assert aligned["align"] == "chunk" and [r["offset"] for r in aligned["records"]] == [0, 0]
    assert aligned["by_offset"]["samples"]["200"] == {"0": 2, "1-3": 0, "4-11": 0, "12-14": 0}
    assert aligned["by_offset"]["accuracy"]["200"]["1-3"] is None
    # --top-k changes how many chunks are read, not the weights.
    assert main(["niah", "--checkpoint", "random:tiny", "--task", "single", "--lengths", "150", "--depths", "0",
                 "--samples", "1", "--top-k", "2", "--data", str(story), "--out", str(out / "k2.json")]) == 0
    k2 = json.loads((out / "k2.json").read_text())
    assert k2["top_k"] == 2 and len(k2["records"][0]["retrieved"]["g0"]) == 2
    assert main(["retrieval", "--checkpoint", "random:tiny", "--text", str(story), "--max-tokens", "120",
                 "--out", str(out / "ret.json")]) == 0
    ret = json.loads((out / "ret.json").read_text())
    assert ret["num_chunks"] == 8 and len(ret["groups"]) == 2 and os.path.isfile(ret["plot"])
    row = ret["groups"][0]["chunks"][-1]  # chunk 7 read up to top_k earlier chunks, weights sum to 1
    assert row["retrieved"] and abs(sum(x["weight"] for x in row["retrieved"]) - 1) < 1e-3
    assert all(x["chunk"] < row["chunk"] - 1 for x in row["retrieved"])
    assert main(["ppl", "--checkpoint", "random:tiny", "--lengths", "64", "--stride", "32", "--max-windows", "2",
                 "--data", str(story), "--out", str(out / "ppl.json")]) == 0
    ppl = json.loads((out / "ppl.json").read_text())["results"][0]
    assert ppl["windows"] == 2 and ppl["tokens_scored"] == 64 + 32 and 100 < ppl["ppl"] < 600
    printed = capsys.readouterr().out
    assert "ppl" in printed and "heatmap" in printed


def _bucket(offset: int) -> str:
    return {0: "0", **dict.fromkeys(range(1, 4), "1-3"), **dict.fromkeys(range(4, 12), "4-11"),
            **dict.fromkeys(range(12, 15), "12-14")}[offset]


def _by_offset_by_hand(records, buckets, keys):
    """eval.py niah's by_offset from its records: per length and over all, per offset bucket (lo <= offset
    < hi), the sample count and the means of correct, answer_loss, recall and, where the records have it,
    needle weight (NaNs left out)."""
    import math

    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else None

    out = {"samples": {}, "accuracy": {}, "answer_loss": {}, "needle_recall": {"g0": {}, "g1": {}}}
    weighted = "needle_weight" in records[0]
    if weighted:
        out["needle_weight"] = {"g0": {}, "g1": {}}
    for key in keys:
        rows = {b: [r for r in records if lo <= r["offset"] < hi and key in ("all", str(r["length"]))]
                for b, (lo, hi) in buckets.items()}
        out["samples"][key] = {b: len(rs) for b, rs in rows.items()}
        out["accuracy"][key] = {b: mean([float(r["correct"]) for r in rs]) for b, rs in rows.items()}
        out["answer_loss"][key] = {b: mean([r["answer_loss"] for r in rs]) for b, rs in rows.items()}
        for g in ("g0", "g1"):
            out["needle_recall"][g][key] = {b: mean([r["recall"][g] for r in rs]) for b, rs in rows.items()}
            if weighted:
                out["needle_weight"][g][key] = {b: mean([r["needle_weight"][g] for r in rs]) for b, rs in rows.items()}
    return out


def test_offset_breakdown_by_hand():
    """Records of two lengths spread over every bucket of S = 15, with recalls that are NaN (no needle chunk)."""
    from drt_jax.evaluate.niah import offset_breakdown, summary_lines

    nan = float("nan")
    spec = [(150, 0, True, 1.0, 1.0), (150, 1, False, 3.0, 0.5), (150, 3, True, 2.0, nan), (150, 4, False, 4.0, 0.0),
            (300, 11, True, 1.5, 1.0), (300, 12, False, 5.0, 0.25), (300, 14, True, 0.5, nan), (300, 0, False, 2.5, 0.0)]
    records = [{"length": L, "offset": o, "correct": c, "answer_loss": loss, "recall": {"g0": rec, "g1": 1.0}}
               for L, o, c, loss, rec in spec]
    buckets = {"0": (0, 1), "1-3": (1, 4), "4-11": (4, 12), "12-14": (12, 15)}
    got = offset_breakdown(records, [150, 300], 15, ["g0", "g1"])
    assert got == _by_offset_by_hand(records, buckets, ["150", "300", "all"])
    # A few cells written out: the aligned pair, and a bucket whose only recall is NaN.
    assert got["accuracy"]["all"]["0"] == 0.5 and got["answer_loss"]["all"]["0"] == 1.75
    assert got["needle_recall"]["g0"]["150"]["1-3"] == 0.5 and got["samples"]["300"]["1-3"] == 0
    assert got["accuracy"]["300"]["1-3"] is None and got["answer_loss"]["300"]["12-14"] == 2.75
    result = {"lengths": [150, 300], "depths": [], "accuracy": {}, "answer_loss": {}, "needle_recall": {},
              "top_k": 4, "chunk_size": 15, "align": "random", "offset_buckets": list(buckets), "by_offset": got}
    lines = summary_lines(result)
    start = [i for i, line in enumerate(lines) if line.startswith("by the question's offset")][0]
    assert lines[start + 1].split() == ["length", "offset", "n", "accuracy", "loss", "recall", "g0", "recall", "g1"]
    rows = [line.split() for line in lines[start + 2 :]]
    # One row per (length, bucket) with samples, then "all": n, accuracy, loss, recall per group.
    assert [r[:3] for r in rows] == [["150", "0", "1"], ["150", "1-3", "2"], ["150", "4-11", "1"],
                                     ["300", "0", "1"], ["300", "4-11", "1"], ["300", "12-14", "2"],
                                     ["all", "0", "2"], ["all", "1-3", "2"], ["all", "4-11", "2"], ["all", "12-14", "2"]]
    assert rows[1][3:] == ["0.500", "2.50", "0.50", "1.00"]


def test_multi_key_sweep_reports_distractor_recall_and_answers_that_copy_one(tmp_path, monkeypatch):
    """niah_sweep on multi-key: each record's distractor chunks (pads counted), their recall and weight
    in the answer's retrieval (and the needle's weight), and whether the answer is another key's value;
    the depth tables and the summary carry them; merging two lengths joins them. The model is a random tiny one; its greedy answers are
    replaced by a distractor's value (sample 0), the true value (sample 1) and its own (sample 2)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from drt_jax import DRT, ModelConfig, chunking
    from drt_jax.data import ByteTokenizer
    from drt_jax.evaluate import niah
    from drt_jax.tasks.niah import NiahTask

    cfg = ModelConfig.from_preset("tiny")
    params = nn.unbox(DRT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32))["params"])
    tok = ByteTokenizer()
    hay = np.frombuffer(STORY.encode(), np.uint8).astype(np.int32)
    task = NiahTask("multi", tok, hay, cfg.chunk_size, seed=2)
    real = niah.answer_diagnostics
    slots = {}  # each answer's retrieval slots (chunk ids, weights) per group, by its true answer

    def fake(eng, prompts, targets):  # a batch's rows are told apart by their true answers
        gen, loss, retrieved, weights = real(eng, prompts, targets)
        first, second = (task.sample(length, 0.5, i) for i in range(2))
        for row, target in enumerate(targets):
            slots[target.tobytes()] = retrieved[:, row], weights[:, row]
            if np.array_equal(target, first.answer):
                gen[row] = first.distractors(cfg.chunk_size)[1][0]
            elif np.array_equal(target, second.answer):
                gen[row] = target
        return gen, loss, retrieved, weights

    results = []
    for length in (900, 960):
        monkeypatch.setattr(niah, "answer_diagnostics", fake)
        r = niah.niah_sweep(cfg, params, tok, hay, task="multi", lengths=[length], depths=[0.5], samples=3,
                            batch_size=1 if length == 900 else 3, seed=2)
        results.append(r)
        flags = []
        for i, rec in enumerate(r["records"]):
            s = task.sample(length, 0.5, i)
            pads = chunking.prompt_padding(0, s.prompt_len, cfg.chunk_size)
            chunks, values = s.distractors(cfg.chunk_size, pads)
            assert rec["distractor_chunks"] == chunks.tolist() and len(values) == 5
            for g, got in rec["distractor_recall"].items():
                assert got == np.isin(chunks, rec["retrieved"][g]).mean()
            ids, w = slots[s.answer.tobytes()]
            for g in range(len(cfg.groups)):
                assert ids[g].tolist() == rec["retrieved"][f"g{g}"]
                needle = w[g][np.isin(ids[g], rec["needle_chunks"])].sum()
                other = w[g][np.isin(ids[g], chunks)].sum()
                assert rec["needle_weight"][f"g{g}"] == pytest.approx(needle, abs=1e-4)
                assert rec["distractor_weight"][f"g{g}"] == pytest.approx(other, abs=1e-4)
                assert 0.0 <= needle + other <= 1.0 + 1e-6 and w[g].sum() == pytest.approx(1.0, abs=1e-5)
            assert rec["answered_distractor"] == any(rec["generated"] == v.tolist() for v in values)
            flags.append((rec["answered_distractor"], rec["correct"]))
        assert flags[:2] == [(True, False), (False, True)]
        assert r["answered_distractor"] == {str(length): {"0.5": np.mean([f[0] for f in flags])}}
        want = np.nanmean([rec["distractor_recall"]["g0"] for rec in r["records"]])
        assert r["distractor_recall"]["g0"][str(length)]["0.5"] == want and set(r["distractor_recall"]) == {"g0", "g1"}
        for key in ("needle_weight", "distractor_weight"):
            want = np.nanmean([rec[key]["g1"] for rec in r["records"]])
            assert r[key]["g1"][str(length)]["0.5"] == pytest.approx(want) and set(r[key]) == {"g0", "g1"}
        lines = niah.summary_lines(r)
        assert any("copied a distractor" in line for line in lines)
        assert any(line.startswith("distractor-chunk recall@") for line in lines)
        assert any(line.startswith("needle-chunk weight g1") for line in lines)
        assert any(line.startswith("distractor-chunk weight g1") for line in lines)
    paths = []
    for r in results:
        paths.append(tmp_path / f"{r['lengths'][0]}.json")
        paths[-1].write_text(json.dumps(r))
    import importlib.util

    spec = importlib.util.spec_from_file_location("plots", os.path.join(ROOT, "experiments", "plots.py"))
    plots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plots)
    merged = plots.merge_niah([str(p) for p in paths])
    assert merged["answered_distractor"] == {**results[0]["answered_distractor"], **results[1]["answered_distractor"]}
    assert set(merged["distractor_recall"]["g1"]) == {"900", "960"}
    assert set(merged["needle_weight"]["g0"]) == set(merged["distractor_weight"]["g1"]) == {"900", "960"}
    assert set(merged["by_offset"]["needle_weight"]["g0"]) == {"900", "960", "all"}


def test_merged_results_recompute_the_offset_breakdown(tmp_path):
    """experiments/plots.py merge: by_offset's "all" covers the lengths of every merged file."""
    import importlib.util

    from drt_jax.evaluate.niah import offset_breakdown

    spec = importlib.util.spec_from_file_location("plots", os.path.join(ROOT, "experiments", "plots.py"))
    plots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plots)
    paths = []
    for length, offsets in ((4096, [0, 5]), (8192, [13])):
        records = [{"length": length, "offset": o, "correct": o == 0, "answer_loss": 1.0 + o, "recall": {"g0": 1.0}}
                   for o in offsets]
        cell = {"0.5": 1.0}
        result = {"checkpoint": "runs/x", "task": "single", "align": "random", "depths": [0.5], "top_k": 8,
                  "chunk_size": 15, "lengths": [length], "samples_per_cell": len(offsets),
                  "accuracy": {str(length): cell}, "answer_loss": {str(length): cell},
                  "needle_recall": {"g0": {str(length): cell}}, "records": records,
                  "by_offset": offset_breakdown(records, [length], 15, ["g0"])}
        paths.append(tmp_path / f"{length}.json")
        paths[-1].write_text(json.dumps(result))
    merged = plots.merge_niah([str(p) for p in paths])
    assert merged["by_offset"]["samples"] == {"4096": {"0": 1, "1-3": 0, "4-11": 1, "12-14": 0},
                                              "8192": {"0": 0, "1-3": 0, "4-11": 0, "12-14": 1},
                                              "all": {"0": 1, "1-3": 0, "4-11": 1, "12-14": 1}}
    assert merged["by_offset"]["answer_loss"]["all"]["12-14"] == 14.0


@pytest.fixture(scope="module")
def marked_run(tmp_path_factory):
    """A run folder (2 training steps) whose corpus has one marked document per file, so the text an
    evaluation read shows which split it came from."""
    from drt_jax.train.loop import train
    from tests.train_fixtures import enable_compilation_cache, small_run

    enable_compilation_cache()
    tmp = tmp_path_factory.mktemp("eval_run")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(f"MARKER{i:02d} " * 60)
    run = small_run(tmp, corpus, name="run")
    train(run, stop_at=2, print_fn=lambda *a: None)
    return run


def _markers(tokens) -> set[str]:
    import re

    return set(re.findall(r"MARKER\d\d", bytes(int(t) for t in tokens if t < 256).decode("latin-1")))


def test_eval_on_a_run_folder_reads_its_held_out_split_unless_told(marked_run, tmp_path, monkeypatch):
    from drt_jax.data import ByteTokenizer, prepare_shards
    from drt_jax.evaluate import niah, perplexity

    shards = prepare_shards(marked_run.data.corpus, ByteTokenizer(), marked_run.data.cache_dir, progress=False)
    train_ids, val_ids = shards.split(marked_run.data.val_fraction)
    marker = lambda d: _markers(shards.document(int(d)))
    held_out = set().union(*(marker(d) for d in val_ids))
    trained_on = set().union(*(marker(d) for d in train_ids))
    assert held_out and trained_on and not held_out & trained_on

    read = {}

    def spy(name, real, position):
        def wrapped(*args, **kwargs):
            read[name] = args[position]
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(perplexity, "perplexity", spy("ppl", perplexity.perplexity, 2))
    monkeypatch.setattr(niah, "niah_sweep", spy("niah", niah.niah_sweep, 3))
    ppl_args = ["ppl", "--checkpoint", str(marked_run.run_dir), "--lengths", "64", "--max-windows", "2"]
    niah_args = ["niah", "--checkpoint", str(marked_run.run_dir), "--lengths", "150", "--depths", "0.5", "--samples", "1"]
    for split, want in [(None, held_out), ("val", held_out), ("train", trained_on), ("all", held_out | trained_on)]:
        extra = [] if split is None else ["--split", split]
        out = tmp_path / f"{split}"
        assert main([*ppl_args, *extra, "--out", str(out / "ppl.json")]) == 0
        assert main([*niah_args, *extra, "--out", str(out / "niah.json")]) == 0
        for name in ("ppl", "niah"):
            got = json.loads((out / f"{name}.json").read_text())
            assert got["split"] == (split or "val") and got["data"] == marked_run.data.corpus, got
            seen = _markers(read[name])
            assert seen and seen <= want, (split, name, seen, want)
        if split == "all":
            assert _markers(read["niah"]) == held_out | trained_on


def test_a_run_that_held_out_nothing_is_a_one_line_error(marked_run, tmp_path):
    import dataclasses
    import shutil

    from drt_jax.train.checkpoints import read_run_config

    run_dir = tmp_path / "no_val"
    shutil.copytree(marked_run.run_dir, run_dir)
    cfg = read_run_config(run_dir)
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, val_fraction=0.0))
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    r = _cli("ppl", "--checkpoint", str(run_dir), "--lengths", "64")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    assert len(lines) == 1 and "held out no text" in lines[0] and "--split" in lines[0], r.stderr
