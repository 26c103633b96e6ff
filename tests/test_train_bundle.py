"""Portable checkpoint bundles: export -> import -> resume continues exactly (fp32 layout), the file
limits hold, an import without optimizer state restarts the optimizer and says so, bad bundles are
one-line errors, and the layout chooser picks the most precise layout that fits."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import zlib

import numpy as np
import pytest

from drt_jax.train import bundle as bundle_lib
from drt_jax.train.loop import train
from tests.train_fixtures import logged_losses, straight_run

RUN = dict(checkpoint_every=4, keep_checkpoints=3, log_every=1, eval_every=0)
TINY_FILE_MIB = 0.0625  # 64 KiB: the small model's 0.47 MiB of fp32 state needs 8 files


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 8-step run with checkpoints 4 and 8."""
    return straight_run(tmp_path_factory.mktemp("bundle"), **RUN)


def _export(run, out: pathlib.Path, max_files: int, capsys) -> str:
    code = bundle_lib.main(["export", "--run-dir", str(run.run_dir), "--step", "4", "--out", str(out),
                            "--max-files", str(max_files), "--max-file-mib", str(TINY_FILE_MIB)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    return printed.out


def _one_line_error(capsys, argv: list[str], *needles: str) -> str:
    assert bundle_lib.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_export_import_resume_continues_exactly(straight, capsys):
    tmp, _, run, losses = straight
    out = tmp / "b-full"
    said = _export(run, out, max_files=10, capsys=capsys)
    assert "parameters float32" in said and "optimizer state float32" in said and said.count("\n") == 1, said
    files = sorted(out.iterdir())
    assert len(files) == 10 and max(p.stat().st_size for p in files) <= TINY_FILE_MIB * 2**20
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["optimizer_dtype"] == "float32"
    assert any(len(t["pieces"]) > 1 for t in manifest["tensors"])  # an array split across files

    target = tmp / "imported-full"
    assert bundle_lib.main(["import", "--bundle", str(out), "--run-dir", str(target)]) == 0
    assert "at step 4" in capsys.readouterr().out
    resumed = run.replace(train=dataclasses.replace(run.train, run_dir=str(target)))
    printed = []
    summary = train(resumed, stop_at=8, print_fn=printed.append)
    assert summary.start_step == 4 and not any("restarts" in line for line in printed), printed
    assert logged_losses(target) == [(s, v) for s, v in losses if s > 4]  # bit for bit


def test_import_without_optimizer_state_restarts_it_and_says_so(straight, capsys):
    tmp, _, run, losses = straight
    out = tmp / "b-small"
    said = _export(run, out, max_files=4, capsys=capsys)
    assert "parameters bfloat16" in said and "no optimizer state" in said, said
    assert len(list(out.iterdir())) == 4

    target = tmp / "imported-small"
    assert bundle_lib.main(["import", "--bundle", str(out), "--run-dir", str(target)]) == 0
    assert "NO optimizer state" in capsys.readouterr().out
    resumed = run.replace(train=dataclasses.replace(run.train, run_dir=str(target)))
    printed = []
    summary = train(resumed, stop_at=6, print_fn=printed.append)
    assert summary.start_step == 4
    assert len([line for line in printed if "the optimizer restarts" in line]) == 1, printed
    redone = dict(logged_losses(target))
    # Step 5's loss is computed before any update, from bf16-rounded parameters: close, not equal.
    assert abs(redone[5] - dict(losses)[5]) < 0.02, (redone, losses)
    assert all(np.isfinite(v) for v in redone.values())


def test_bad_bundles_are_one_line_errors(straight, capsys):
    tmp, _, run, _ = straight
    out = tmp / "b-bad"
    _export(run, out, max_files=10, capsys=capsys)
    _one_line_error(capsys, ["import", "--bundle", str(out), "--run-dir", str(tmp / "x1"), "--set", "model.mlp_dim=96"],
                    "model.mlp_dim")
    _one_line_error(capsys, ["import", "--bundle", str(out), "--run-dir", str(run.run_dir)], "already holds checkpoint 8")
    data = (out / "arrays-3.bin").read_bytes()
    (out / "arrays-3.bin").write_bytes(data[:-10])
    _one_line_error(capsys, ["import", "--bundle", str(out), "--run-dir", str(tmp / "x2")], "arrays-3.bin", "truncated")
    (out / "arrays-3.bin").unlink()
    _one_line_error(capsys, ["import", "--bundle", str(out), "--run-dir", str(tmp / "x3")], "arrays-3.bin is missing")
    _one_line_error(capsys, ["import", "--bundle", str(tmp / "nowhere"), "--run-dir", str(tmp / "x4")], "not a bundle")
    _one_line_error(capsys, ["export", "--run-dir", str(run.run_dir), "--out", str(tmp / "b-tiny"), "--max-files", "3",
                             "--max-file-mib", str(TINY_FILE_MIB)], "raise --max-files or --max-file-mib")
    _one_line_error(capsys, ["export", "--run-dir", str(run.run_dir), "--out", str(out)], "not empty")
    assert not (tmp / "x1").exists() and not (tmp / "x2").exists()


def test_layout_and_packing():
    params = {"a": np.ones((100,), np.float32)}
    opt = {"mu": np.ones((100,), np.float32), "nu": np.ones((100,), np.float32), "count": np.zeros((), np.int32)}
    assert bundle_lib.plan_layout(params, opt, 1204) == ("float32", "float32")
    assert bundle_lib.plan_layout(params, opt, 804) == ("float32", "bfloat16")
    assert bundle_lib.plan_layout(params, opt, 604) == ("bfloat16", "bfloat16")
    assert bundle_lib.plan_layout(params, opt, 400) == ("float32", None)
    assert bundle_lib.plan_layout(params, opt, 200) == ("bfloat16", None)
    with pytest.raises(bundle_lib.BundleError, match="raise --max-files"):
        bundle_lib.plan_layout(params, opt, 199)
    arrays = [("p", "x", np.arange(10, dtype=np.float32)), ("p", "y", np.arange(7, dtype=np.int32).reshape(7, 1)),
              ("p", "e", np.zeros((0,), np.float32))]
    files, entries = bundle_lib.pack(arrays, 16)
    assert max(len(f) for f in files) <= 16 and sum(len(f) for f in files) == 68
    for (_, _, a), entry in zip(arrays, entries, strict=True):
        np.testing.assert_array_equal(bundle_lib.unpack(entry, files), a)


def test_regroup_names():
    names = bundle_lib.regroup_names((4, 4), (4, 2, 2))
    assert names["['group0_layer_1']"] == "['group0_layer_1']"
    assert names["['group1_layer_0']"] == "['group0_layer_2']" and names["['group1_layer_1']"] == "['group0_layer_3']"
    assert names["['landmark_norm_g1']"] == "['landmark_norm_g0']"
    back = bundle_lib.regroup_names((2, 1, 1), (2, 2))
    assert back["['group0_layer_1']"] == "['group1_layer_0']" and back["['landmark_norm_g0']"] == "['landmark_norm_g0']"
    for new in ((4, 3, 2), (3, 3, 2), (4,)):
        with pytest.raises(bundle_lib.BundleError, match="not a regrouping"):
            bundle_lib.regroup_names((4, 4), new)


def _hand_bundle(run, out: pathlib.Path) -> dict:
    """A bundle of `run`'s freshly initialised parameters (fp32, no optimizer state), by hand."""
    import flax.linen as nn
    import jax

    from drt_jax.model import DRT

    tokens = np.zeros((1, 2 * run.model.slots_per_chunk), np.int32)
    params = nn.unbox(DRT(run.model).init(jax.random.PRNGKey(3), tokens)["params"])
    flat = bundle_lib.flatten(jax.tree.map(np.asarray, params))
    files, entries = bundle_lib.pack([("params", k, v) for k, v in flat.items()], 1 << 20)
    out.mkdir()
    for i, f in enumerate(files):
        (out / f"arrays-{i}.bin").write_bytes(f)
    (out / "config.json").write_text(run.to_json())
    (out / "manifest.json").write_text(json.dumps({
        "format": bundle_lib.FORMAT, "step": 5, "rng": [0, 1], "data_iterator": "{}", "commit": "test", "source_run": "-",
        "params_dtype": "float32", "optimizer_dtype": None, "tensors": entries,
        "files": {f"arrays-{i}.bin": {"bytes": len(f), "crc32": zlib.crc32(f)} for i, f in enumerate(files)}}))
    return flat


def test_regroup_bundle_recuts_the_upper_layers(straight, capsys, tmp_path):
    _, _, run, _ = straight
    two = run.replace(model=run.model.replace(decoder_layers=(1, 2)))
    old = _hand_bundle(two, tmp_path / "b12")
    cfg = tmp_path / "target.py"
    cfg.write_text("from drt_jax.train.config import RunConfig\nimport json\n"
                   f"RUN = RunConfig.from_dict(json.loads({two.to_json()!r}))\n")
    out = tmp_path / "b111"
    assert bundle_lib.main(["regroup", "--bundle", str(tmp_path / "b12"), "--config", str(cfg),
                            "--set", "model.decoder_layers=(1,1,1)", "--out", str(out)]) == 0
    assert "(1, 2) -> (1, 1, 1)" in capsys.readouterr().out
    manifest, target, files = bundle_lib.read_bundle(out)
    assert target.model.decoder_layers == (1, 1, 1) and manifest["optimizer_dtype"] is None
    new = {e["name"]: bundle_lib.unpack(e, files) for e in manifest["tensors"]}
    for name, array in new.items():
        source = (name.replace("['group1_layer_0']", "['group0_layer_1']")
                  .replace("['landmark_norm_g1']", "['landmark_norm_g0']"))
        np.testing.assert_array_equal(array, old[source], err_msg=name)
    assert any("group1_layer_0" in n for n in new) and any("landmark_norm_g1" in n for n in new)
    # The result imports into a run of the new layout (every parameter present, every shape right).
    assert bundle_lib.main(["import", "--bundle", str(out), "--run-dir", str(tmp_path / "r111")]) == 0
    capsys.readouterr()
    _one_line_error(capsys, ["regroup", "--bundle", str(tmp_path / "b12"), "--config", str(cfg), "--set",
                             "model.decoder_layers=(1,1)", "--out", str(tmp_path / "x")], "not a regrouping")
    _one_line_error(capsys, ["regroup", "--bundle", str(tmp_path / "b12"), "--config", str(cfg), "--set",
                             "model.decoder_layers=(1,1,1)", "model.d_model=64", "--out", str(tmp_path / "y")],
                    "beyond decoder_layers", "model.d_model")


def test_segment_resumes_a_kept_run_instead_of_importing(straight, capsys, tmp_path):
    """segment.py --bundle-in on a machine that still holds the run at or past the bundle's step (a job
    restarted on the same host) resumes there, where the import would refuse."""
    from tests.test_experiments import _load

    tmp, _, run, _ = straight
    segment = _load("segment")
    out = tmp_path / "b4"
    _export(run, out, max_files=10, capsys=capsys)
    assert segment.kept_step(run.run_dir, out) == 8  # checkpoints 4 and 8; the bundle is step 4
    assert segment.kept_step(tmp_path / "fresh", out) is None
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "step": 9}))
    assert segment.kept_step(run.run_dir, out) is None  # the bundle is newer: import it
