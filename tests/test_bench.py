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
                       "--out", str(out), "--hlo-dir", str(tmp_path / "hlo"), "--profile", "1", "--profile-top", "5",
                       "--model-set", "mlp_impl=reference", "lse_impl=reference"]) == 0
    result = json.loads(out.read_text())
    (row,) = result["cases"]
    assert row["status"] == "ok", row
    assert result["settings"]["batch"] == 3
    assert row["tokens_per_step"] == 3 * 64
    assert abs(row["tokens_per_s"] * row["step_s"] - 3 * 64) < 1e-6
    assert row["profile"]["steps"] == 1
    assert result["settings"]["model_set"] == {"mlp_impl": "reference", "lse_impl": "reference"}
    import gzip

    assert gzip.open(tmp_path / "hlo" / "tiny-64-none.hlo.txt.gz", "rt").read().startswith("HloModule")


def test_loss_head_bench_times_each_block_size_and_reports_the_loss(tmp_path):
    out = tmp_path / "lh.json"
    _bench("loss_head").main(["--tokens", "96", "--blocks", "32", "96", "--d-model", "16", "--vocab", "300",
                              "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [(c["tokens"], c["block"]) for c in result["cases"]] == [(96, 32), (96, 96)]
    losses = [c["loss"] for c in result["cases"]]
    assert abs(losses[0] - losses[1]) < 1e-3 and 5.0 < losses[0] < 7.0  # about log(300) for random logits
    assert result["command"].startswith("PYTHONPATH=. python bench/loss_head.py")


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


def test_log_normaliser_bench_checks_every_tiling_against_the_reference(tmp_path):
    out = tmp_path / "ln.json"
    _bench("log_normaliser").main(["--shape", "2", "4", "384", "--valid", "300", "--rows", "1", "4", "--tile-bytes", "256",
                                   "1024", "--warps", "4", "--stages", "3", "--repeats", "1", "--interpret", "--out", str(out)])
    result = json.loads(out.read_text())
    kernels = [c for c in result["cases"] if c["impl"] == "pallas_gpu"]
    assert [(c["tiling"]["rows"], c["tiling"]["tile_bytes"]) for c in kernels] == [(1, 256), (1, 1024), (4, 256), (4, 1024)]
    assert all(c["max_abs_err"] < 1e-4 for c in kernels), kernels
    assert result["cases"][0]["impl"] == "reference"
    assert result["command"].startswith("PYTHONPATH=. python bench/log_normaliser.py")


def test_log_normaliser_bench_times_the_gradient_kernel_against_the_path_it_replaces(tmp_path):
    out = tmp_path / "grad.json"
    _bench("log_normaliser").main(["--op", "gradient", "--shape", "2", "4", "384", "--valid", "300", "--rows", "1", "2",
                                   "--tile-bytes", "512", "--warps", "4", "--stages", "3", "--programs", "0", "2",
                                   "--repeats", "1", "--interpret", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["op"] == "gradient"
    assert [c["impl"] for c in result["cases"]] == ["reference", "lse+xla"] + ["pallas_gpu"] * 4
    assert [(c["tiling"]["rows"], c["tiling"]["programs"]) for c in result["cases"][2:]] == [(1, 0), (1, 2), (2, 0), (2, 2)]
    # bfloat16 gradients of magnitude up to 1 round to within 2^-9 of the reference's
    assert all(c["max_abs_err"] < 4e-3 for c in result["cases"]), result["cases"]


def test_log_normaliser_bench_refuses_a_tiling_that_is_not_a_power_of_two(capsys):
    import pytest

    with pytest.raises(SystemExit):
        _bench("log_normaliser").main(["--rows", "3"])
    assert "Tiling.rows=3: use a power of two" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _bench("log_normaliser").main(["--programs", "256"])
    assert "--programs is the gradient kernel's: add --op gradient" in capsys.readouterr().err


def test_train_throughput_parses_model_settings_as_train_py_does(capsys):
    """--model-set values are typed as train.py's --set model.FIELD=VALUE (fuse_qkv=false is False, not
    the string "false"), and a bad one is refused in one line before anything runs."""
    import pytest

    with pytest.raises(SystemExit):
        _bench("train_throughput").main(["--models", "tiny", "--model-set", "fuse_qkv=maybe"])
    assert "model.fuse_qkv" in capsys.readouterr().err
