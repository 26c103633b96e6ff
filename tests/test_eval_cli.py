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
