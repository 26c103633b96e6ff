"""Sharding and multi-host: a (data=2, fsdp=2, tensor=2) mesh of 8 simulated CPU devices gives the
1-device losses and params; a checkpoint restores onto another mesh shape; a genuine 2-process run
(jax.distributed on localhost, gloo collectives) trains and writes one checkpoint."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

from tests.train_fixtures import REPO, cli_env, config_file, logged_losses, run_cli, write_corpus

EIGHT_DEVICES = textwrap.dedent(
    """
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from drt_jax.config import ModelConfig
    from drt_jax.train import mesh as M, step as S
    from drt_jax.train.checkpoints import Checkpointer
    from drt_jax.train.config import DEFAULT_RULES, MeshConfig, OptimConfig
    from drt_jax.train.optim import make_optimizer

    assert jax.device_count() == 8
    from tests.train_fixtures import SMALL_MODEL
    cfg = ModelConfig(**SMALL_MODEL)
    tx, sched = make_optimizer(OptimConfig(peak_lr=3e-3, warmup_steps=1, end_lr=1e-3), 10)
    rng = np.random.RandomState(0)
    # Three steps: the first has learning rate 0 (warm-up), so parameters reflect two updates.
    batches = [rng.randint(0, 256, (4, 64)).astype(np.int32) for _ in range(3)]

    def run(mesh_cfg, devices):
        mesh = M.make_mesh(mesh_cfg, devices)
        spec = S.state_spec(cfg, tx, mesh, DEFAULT_RULES)
        state = S.init_state(cfg, tx, spec, seed=0)
        bsh = M.batch_sharding(mesh, DEFAULT_RULES)
        step = S.make_train_step(cfg, tx, sched, spec, bsh, grad_accum=1, block_size=32)
        losses, grad_norms = [], []
        for b in batches:
            state, m = step(state, M.global_batch({"tokens": b, "mask": np.ones_like(b)}, bsh, 4))
            losses.append(float(m["loss"]))
            grad_norms.append(float(m["grad_norm"]))
        return state, losses, grad_norms

    s1, l1, g1 = run(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    s8, l8, g8 = run(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices())
    # Clipped AdamW updates do not change with a uniform gradient scale; the gradient norm does.
    np.testing.assert_allclose(g1, g8, rtol=2e-5)
    q = s8["params"]["lower_0"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor"), q.sharding.spec
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (16, 2, 8)
    mu = jax.tree.leaves(s8["opt_state"])
    assert any(getattr(x, "sharding", None) is not None and x.sharding.spec == q.sharding.spec for x in mu)
    np.testing.assert_allclose(l1, l8, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s8["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)

    # Save on (2, 2, 2), restore onto (1, 4, 2).
    ck = Checkpointer(sys.argv[1], keep=1)
    ck.save(3, s8, model=cfg)
    ck.wait()
    spec_b = S.state_spec(cfg, tx, M.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)), DEFAULT_RULES)
    back = ck.restore(3, spec_b.abstract)
    ck.close()
    qb = back["params"]["lower_0"]["attn"]["q"]["kernel"]
    assert qb.sharding.mesh.shape["fsdp"] == 4 and qb.addressable_shards[0].data.shape == (8, 2, 8)
    for a, b in zip(jax.tree.leaves(s8), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("RESULT", json.dumps({"l1": l1, "l8": l8}))
    """
)


def test_eight_device_mesh_matches_one_device_and_restores_onto_another_mesh(tmp_path):
    script = tmp_path / "eight.py"
    script.write_text(EIGHT_DEVICES)
    env = cli_env()
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], capture_output=True, text=True,
                          timeout=400, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert len(result["l8"]) == 3 and all(4.0 < x < 7.0 for x in result["l8"]), result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_run_trains_and_checkpoints(tmp_path):
    """Two processes, each with half of every batch, train as one process does: the same losses and the
    same parameters (no dropout or Gumbel noise, which depend on a row's place in the global batch)."""
    from drt_jax.data import load_tokenizer, prepare_shards
    from drt_jax.train.checkpoints import load_for_eval

    corpus = write_corpus(tmp_path / "corpus")
    # Build the token shards once up front so the two processes only read them.
    prepare_shards(str(corpus), load_tokenizer("byte"), str(tmp_path / "cache"), progress=False)
    overrides = ["train.grad_accum=1", "train.log_every=1", "data.val_fraction=0.0", "model.dropout_rate=0.0",
                 "model.gumbel_noise=False"]
    cfg = config_file(tmp_path, corpus, steps=4, checkpoint_every=4, eval_every=0, name="mp")
    port = _free_port()
    env = cli_env()
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), "--config", str(cfg), "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", "2", "--process-id", str(i), "--set", *overrides],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO),
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=400))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    assert "step 4: loss" in outs[0][0]
    step_dir = tmp_path / "mp" / "checkpoints" / "4"
    assert (step_dir / "commit_success.txt").exists() or (step_dir / "_CHECKPOINT_METADATA").exists()
    assert sorted(p.name for p in (step_dir / "data").glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert [p.name for p in (tmp_path / "mp" / "checkpoints").iterdir() if p.name.isdigit()] == ["4"]
    cfg_json = json.loads((tmp_path / "mp" / "config.json").read_text())
    assert cfg_json["mesh"]["num_processes"] == 2

    one = run_cli(["--config", str(config_file(tmp_path, corpus, steps=4, checkpoint_every=4, eval_every=0, name="one")),
                   "--set", *overrides], timeout=400)
    assert one.returncode == 0, one.stderr[-4000:]
    two_losses, one_losses = logged_losses(tmp_path / "mp"), logged_losses(tmp_path / "one")
    assert [s for s, _ in two_losses] == [s for s, _ in one_losses] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in two_losses], [v for _, v in one_losses], rtol=1e-5)
    _, two_params, _ = load_for_eval(tmp_path / "mp")
    _, one_params, _ = load_for_eval(tmp_path / "one")
    for a, b in zip(jax.tree.leaves(two_params), jax.tree.leaves(one_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
