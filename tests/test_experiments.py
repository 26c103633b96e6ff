"""experiments/: its configs load and validate, and gca_probe measures what it says it measures."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax.config import ModelConfig
from drt_jax.data import ByteTokenizer
from drt_jax.model import DRT
from drt_jax.tasks.niah import NiahTask
from drt_jax.train.config import load_run_config

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _probe():
    spec = importlib.util.spec_from_file_location("gca_probe", EXPERIMENTS / "gca_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted((EXPERIMENTS / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_experiment_configs_load(path):
    run = load_run_config(str(path))
    assert run.name == path.stem
    assert run.data.seq_len <= 16384  # the training-length bound


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
    task = NiahTask("single", ByteTokenizer(), np.arange(97, 123, dtype=np.int32).repeat(40), S, seed=0)
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
    # A needle chunk that was not retrieved gives weight 0 and mass 0.
    rec["indices"] = np.full_like(indices, C - 1)
    w_needle, _, mass = probe.gca_stats([rec], [sample], S)
    assert w_needle == 0.0 and mass["layer0"] == 0.0


def test_probe_retrieval_reach_counts_distances_back():
    probe = _probe()
    cfg = ModelConfig.from_preset("tiny")
    idx = np.array([[[-1, -1], [0, -1], [1, 0], [0, 2]]], np.int32)  # row c is what chunk c reads
    reach = probe.retrieval_reach([{"indices": idx}], cfg)
    # distances: 1; 1, 2; 3, 1
    assert reach["mean_distance"] == pytest.approx(8 / 5)
    assert reach["frac_within_window"] == pytest.approx(np.mean(np.array([1, 1, 2, 3, 1]) <= cfg.window // cfg.slots_per_chunk))
