"""train.py's bad inputs: each gives one line on stderr (no traceback) and exit status 2."""

from __future__ import annotations

import pytest

from drt_jax.config import ConfigError
from drt_jax.train.config import RunConfig, apply_overrides, load_run_config
from tests.train_fixtures import assert_one_line_error, config_file, run_cli, write_corpus


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = config_file(tmp_path, tmp_path / "empty")
    assert_one_line_error(run_cli(["--config", str(cfg)]), "no documents")


def test_corpus_smaller_than_one_batch(tmp_path):
    corpus = write_corpus(tmp_path / "small", n_docs=3, words_per_doc=10)
    cfg = config_file(tmp_path, corpus)
    assert_one_line_error(run_cli(["--config", str(cfg)]), "one batch needs")


def test_missing_tokenizer_file(tmp_path):
    corpus = write_corpus(tmp_path / "c", n_docs=4, words_per_doc=50)
    cfg = config_file(tmp_path, corpus)
    assert_one_line_error(run_cli(["--config", str(cfg), "--set", f"data.tokenizer={tmp_path}/nope.json"]), "tokenizer file not found")


def test_bad_keys_and_values():
    assert_one_line_error(run_cli(["--config", "tiny", "--set", "train.stepz=3", "--print-config"]), "train.stepz", "train.steps")
    assert_one_line_error(run_cli(["--config", "nope"]), "unknown config")


def test_overrides_are_type_checked():
    run = load_run_config("tiny", ["train.steps=7", "model.dropout_rate=0.1", "optim.peak_lr=1e-3", "mesh.fsdp=2",
                                   "model.decoder_layers=(2,1)", "optim.clip_norm=none", "train.async_checkpoints=false",
                                   "data.corpus=/x", "name=foo", "train.loss_logits_dtype=bfloat16"])
    assert run.train.steps == 7 and run.model.dropout_rate == 0.1 and run.optim.peak_lr == 1e-3
    assert run.mesh.fsdp == 2 and run.model.decoder_layers == (2, 1) and run.optim.clip_norm is None
    assert run.train.async_checkpoints is False and run.data.corpus == "/x" and run.name == "foo"
    assert str(run.run_dir) == "runs/foo" and run.train.loss_logits_dtype == "bfloat16"
    assert apply_overrides(run, ["optim.peak_lr=1"]).optim.peak_lr == 1.0  # int accepted for float
    bad = [
        (["train.steps=1.5"], "train.steps"),
        (["train.steps=abc"], "train.steps"),
        (["model.dropout_rate=x"], "model.dropout_rate"),
        (["optim.peak_lrr=1"], "optim.peak_lr"),
        (["trian.steps=1"], "train.steps"),
        (["data.batch_size=4"], "train.batch"),
        (["train.steps"], "key=value"),
        (["model.n_heads=3"], "n_heads"),
        (["train.batch=6", "train.grad_accum=4"], "grad_accum"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "at most one -1"),
        (["data.seq_len=1"], "seq_len"),
        (["train.stop_at_step=0"], "train.stop_at_step"),
        (["train.loss_logits_dtype=float16"], "train.loss_logits_dtype='float16': choose one of float32, bfloat16"),
    ]
    for overrides, needle in bad:
        with pytest.raises(ConfigError) as err:
            load_run_config("tiny", overrides)
        assert needle in str(err.value) and "\n" not in str(err.value), (overrides, str(err.value))


def test_config_round_trips_through_json():
    run = load_run_config("tiny", ["model.decoder_layers=(2,1)", "optim.clip_norm=none"])
    import json

    assert RunConfig.from_dict(json.loads(run.to_json())) == run


def test_presets_have_runs():
    for name in ("tiny", "drt-133m", "swa-133m", "full-133m"):
        run = load_run_config(name)
        assert run.model.name == name and run.model.param_dtype == "float32"
