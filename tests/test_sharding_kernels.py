"""Per-shard kernels under the trainer's meshes (issue 10): on 8 simulated CPU devices the attention and
GCA references are made opaque custom ops that XLA cannot partition (tests/opaque_kernels.py, the CPU
stand-in for Pallas/Triton/cuDNN custom calls). The trainer's sharded step must run them per shard on
fsdp (1x8), data x fsdp (2x4) and data x tensor (4x2) meshes and match the 1-device losses and params;
left to XLA, the same step fails with the GPU run's "custom_partitioner" error."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.train_fixtures import REPO, cli_env

SCRIPT = textwrap.dedent(
    """
    import os, json, dataclasses
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from tests import opaque_kernels
    from drt_jax.config import ConfigError, ModelConfig
    from drt_jax.train import mesh as M, step as S
    from drt_jax.train.config import DEFAULT_RULES, MeshConfig, OptimConfig
    from drt_jax.train.optim import make_optimizer

    opaque_kernels.install()
    assert jax.device_count() == 8
    cfg = ModelConfig(name="t", d_model=32, n_heads=4, n_kv_heads=2, mlp_dim=64, decoder_layers=(1, 1),
                      encoder_layers=1, chunk_size=7, window=16, top_k=2, dropout_rate=0.1)
    tx, sched = make_optimizer(OptimConfig(peak_lr=3e-3, warmup_steps=1, end_lr=1e-3), 10)
    rng = np.random.RandomState(0)
    batches = [rng.randint(0, 256, (8, 64)).astype(np.int32) for _ in range(2)]

    init = None

    def run(mesh_cfg, devices, per_shard=True):
        global init
        mesh = M.make_mesh(mesh_cfg, devices)
        M.check_kernel_split(cfg, mesh, DEFAULT_RULES)
        spec = S.state_spec(cfg, tx, mesh, DEFAULT_RULES)
        if not per_shard:
            spec = dataclasses.replace(spec, kernels=None)
        # One initialisation (on the first mesh), placed onto every mesh: one compile less per mesh.
        init = jax.device_get(S.init_state(cfg, tx, spec, seed=0)) if init is None else init
        state = jax.device_put(init, spec.shardings)
        bsh = M.batch_sharding(mesh, DEFAULT_RULES)
        step = S.make_train_step(cfg, tx, sched, spec, bsh, grad_accum=1, block_size=32)
        losses = []
        for b in batches:
            state, m = step(state, M.global_batch({"tokens": b, "mask": np.ones_like(b)}, bsh, 8))
            losses.append(float(m["loss"]))
        return jax.device_get(state["params"]), losses

    p1, l1 = run(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    out = {"one": l1}
    for name, mc in {"fsdp": MeshConfig(data=1, fsdp=8, tensor=1), "data_fsdp": MeshConfig(data=2, fsdp=4, tensor=1),
                     "data_tensor": MeshConfig(data=4, fsdp=1, tensor=2)}.items():
        p, l = run(mc, jax.devices())
        np.testing.assert_allclose(l, l1, rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
        out[name] = l

    # The same kernels left for XLA to partition: the GPU run's failure.
    try:
        run(MeshConfig(data=1, fsdp=8, tensor=1), jax.devices(), per_shard=False)
        out["unwrapped"] = "ran"
    except Exception as err:
        out["unwrapped"] = str(err).splitlines()[0]

    # Heads that cannot split over the tensor axis fail before anything compiles.
    try:
        M.check_kernel_split(cfg, M.make_mesh(MeshConfig(data=2, fsdp=1, tensor=4)), DEFAULT_RULES)
    except ConfigError as err:
        out["heads_error"] = str(err)
    print("RESULT", json.dumps(out))
    """
)


def test_sharded_step_runs_opaque_kernels_per_shard_and_matches_one_device(tmp_path):
    script = tmp_path / "kernels.py"
    script.write_text(SCRIPT)
    env = cli_env()
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=400, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert all(4.0 < x < 7.0 for x in result["one"]), result
    assert set(result) >= {"fsdp", "data_fsdp", "data_tensor"}, result
    assert "custom_partitioner" in result["unwrapped"], result["unwrapped"]
    err = result["heads_error"]
    assert "\n" not in err and "model.n_kv_heads=2" in err and "change mesh.tensor" in err, err
