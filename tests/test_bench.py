"""bench/ scripts: the options a results table depends on (not timings)."""

import importlib.util
import json
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_throughput_counts_every_sequence_of_a_batch(tmp_path):
    out = tmp_path / "tt.json"
    bench = _bench("train_throughput")
    assert bench.main(["--models", "tiny", "--lengths", "64", "--batch", "3", "--steps", "1", "--remat", "none",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["cases"]
    assert row["status"] == "ok", row
    assert result["settings"]["batch"] == 3
    assert row["tokens_per_step"] == 3 * 64
    assert abs(row["tokens_per_s"] * row["step_s"] - 3 * 64) < 1e-6


def test_train_throughput_loop_mode_times_the_loop_against_its_step(tmp_path):
    """--run: the step alone and train.py's loop on the same run config, with their ratio."""
    out = tmp_path / "loop.json"
    bench = _bench("train_throughput")
    assert bench.main(["--run", "tiny", "--set", "train.batch=2", "data.seq_len=64", "--warmup", "2", "--loop-steps", "8",
                       "--step-repeats", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "loop"
    (row,) = result["cases"]
    assert row["status"] == "ok" and row["tokens_per_step"] == 2 * 64
    assert row["loop_steps_timed"] >= 4
    assert abs(row["ratio"] - row["step_s"] / row["loop_step_s"]) < 1e-9
    assert abs(row["loop_tokens_per_s"] * row["loop_step_s"] - 2 * 64) < 1e-6
