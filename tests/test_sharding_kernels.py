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

import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh

from drt_jax.config import ConfigError
from drt_jax.train import mesh as mesh_lib
from drt_jax.train.config import DEFAULT_RULES, MESH_AXES
from pallas_kernels import grouped_cross_attention
from tests.conftest import small_config
from tests.train_fixtures import REPO, cli_env


def _mesh(data=1, fsdp=1, tensor=1):
    """An abstract (data, fsdp, tensor) mesh: the start-up checks need no devices."""
    return AbstractMesh((data, fsdp, tensor), MESH_AXES)


def test_kernel_mesh_splits_batch_over_data_fsdp_and_heads_over_tensor():
    km = mesh_lib.kernel_mesh(_mesh(2, 2, 2), DEFAULT_RULES)
    assert (km.batch, km.heads) == (("data", "fsdp"), ("tensor",))
    # A mesh axis already splitting the batch cannot split the heads too.
    rules = (("batch", ("data", "tensor")), ("heads", "tensor"))
    assert mesh_lib.kernel_mesh(_mesh(2, 1, 2), rules).heads == ()


@pytest.mark.parametrize("n_heads,n_kv_heads,tensor", [(4, 2, 4), (6, 3, 2)])
def test_heads_that_cannot_split_over_tensor_are_a_one_line_config_error(n_heads, n_kv_heads, tensor):
    cfg = small_config(n_heads=n_heads, n_kv_heads=n_kv_heads, d_model=48)
    with pytest.raises(ConfigError) as err:
        mesh_lib.check_kernel_split(cfg, _mesh(data=2, tensor=tensor), DEFAULT_RULES)
    msg = str(err.value)
    assert "\n" not in msg and f"model.n_kv_heads={n_kv_heads}" in msg and msg.endswith("change mesh.tensor"), msg
    mesh_lib.check_kernel_split(cfg, _mesh(data=2, fsdp=4), DEFAULT_RULES)  # no tensor axis: anything goes


def test_a_batch_that_cannot_split_is_a_one_line_error_naming_the_mesh_axes():
    q, mem = jnp.zeros((3, 2, 4, 4, 8)), jnp.zeros((3, 2, 4, 2, 8))
    idx, w = jnp.zeros((3, 2, 1), jnp.int32), jnp.ones((3, 2, 1))
    km = mesh_lib.kernel_mesh(_mesh(data=2, fsdp=2), DEFAULT_RULES)
    with pytest.raises(ValueError, match=r"batch dimension of size 3 .* change mesh.data or mesh.fsdp$"):
        grouped_cross_attention(q, mem, mem, idx, w, kernel_mesh=km)

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
    from tests.train_fixtures import SMALL_MODEL
    cfg = ModelConfig(**SMALL_MODEL)
    tx, sched = make_optimizer(OptimConfig(peak_lr=3e-3, warmup_steps=1, end_lr=1e-3), 10)
    rng = np.random.RandomState(0)
    # Three steps: the first has learning rate 0 (warm-up), so parameters reflect two updates.
    batches = [rng.randint(0, 256, (8, 64)).astype(np.int32) for _ in range(3)]

    init = None

    def run(mesh_cfg, devices, per_shard=True, cfg=cfg):
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
        losses, grad_norms = [], []
        for b in batches:
            state, m = step(state, M.global_batch({"tokens": b, "mask": np.ones_like(b)}, bsh, 8))
            losses.append(float(m["loss"]))
            grad_norms.append(float(m["grad_norm"]))
        return jax.device_get(state["params"]), losses, grad_norms

    p1, l1, g1 = run(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    out = {"one": l1}
    # The last case also stacks q, k and v into one GEMM (model.fuse_qkv) with the heads split over tensor.
    for name, mc, fuse in [("fsdp", MeshConfig(data=1, fsdp=8, tensor=1), False),
                           ("data_fsdp", MeshConfig(data=2, fsdp=4, tensor=1), False),
                           ("data_tensor", MeshConfig(data=4, fsdp=1, tensor=2), False),
                           ("data_tensor_fused_qkv", MeshConfig(data=4, fsdp=1, tensor=2), True)]:
        p, l, g = run(mc, jax.devices(), cfg=dataclasses.replace(cfg, fuse_qkv=fuse))
        np.testing.assert_allclose(l, l1, rtol=1e-5, err_msg=name)
        # Clipped AdamW updates do not change with a uniform gradient scale; the gradient norm does.
        np.testing.assert_allclose(g, g1, rtol=1e-5, err_msg=name)
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


def _run_on_eight_cpu_devices(tmp_path, text: str, timeout: int) -> dict:
    """Runs a script (which sets up 8 simulated CPU devices itself) in a fresh process -> the JSON it
    prints after "RESULT"."""
    script = tmp_path / "script.py"
    script.write_text(text)
    env = cli_env()
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def test_sharded_step_runs_opaque_kernels_per_shard_and_matches_one_device(tmp_path):
    result = _run_on_eight_cpu_devices(tmp_path, SCRIPT, timeout=400)
    assert all(4.0 < x < 7.0 for x in result["one"]), result
    assert set(result) >= {"fsdp", "data_fsdp", "data_tensor", "data_tensor_fused_qkv"}, result
    assert "custom_partitioner" in result["unwrapped"], result["unwrapped"]
    err = result["heads_error"]
    assert "\n" not in err and "model.n_kv_heads=2" in err and "change mesh.tensor" in err, err


PALLAS_SCRIPT = textwrap.dedent(
    """
    import os, functools
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from drt_jax import attention
    from drt_jax.train import mesh as M
    from drt_jax.train.config import DEFAULT_RULES, MeshConfig
    from pallas_kernels.gca import api
    from pallas_kernels.gca.pallas_tpu import gca_pallas_tpu

    # The TPU kernels in interpret mode, reached through the dispatchers as on a TPU.
    calls = []  # per-shard shapes the kernels saw: proof that no call fell back to the reference

    def gca_interpret(q, *args, **kwargs):
        calls.append(("gca", q.shape))
        return gca_pallas_tpu(q, *args, interpret=True, **kwargs)

    def splash_interpret(q, *args, splash=attention.splash_attention, **kwargs):
        calls.append(("splash", q.shape))
        return splash(q, *args, interpret=True, **kwargs)

    api.register("pallas_tpu", "__main__", "gca_interpret")
    attention._splash_unsupported = lambda q, slopes: None
    attention.splash_attention = splash_interpret

    km = M.kernel_mesh(M.make_mesh(MeshConfig(data=4, fsdp=1, tensor=2)), DEFAULT_RULES)
    r = np.random.RandomState(0)
    B, C, S, H, Hkv, D, Mem, K, T = 4, 4, 8, 4, 2, 16, 4, 2, 128
    arr = lambda *shape: jnp.asarray(r.randn(*shape), jnp.float32)
    q, k, v, w = arr(B, C, S, H, D), arr(B, Mem, S, Hkv, D), arr(B, Mem, S, Hkv, D), jnp.abs(arr(B, C, K))
    idx = jnp.asarray(r.randint(-1, Mem, (B, C, K)), jnp.int32)
    qa, ka, va = arr(B, T, H, D), arr(B, T, Hkv, D), arr(B, T, Hkv, D)

    def grads(f, *args):
        def loss(*a):
            return jnp.sum(jnp.sin(f(*a)))
        return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)

    gca = lambda impl: lambda q, k, v, w: api.grouped_cross_attention(q, k, v, idx, w, impl=impl, kernel_mesh=km)
    for a, b in zip(grads(gca("reference"), q, k, v, w), grads(gca("pallas_tpu"), q, k, v, w), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    attn = lambda impl: lambda q, k, v: attention.causal_attention(q, k, v, window=16, impl=impl, kernel_mesh=km)
    for a, b in zip(grads(attn("reference"), qa, ka, va), grads(attn("splash"), qa, ka, va), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert sorted(set(calls)) == [("gca", (1, C, S, H // 2, D)), ("splash", (1, T, H // 2, D))], calls

    # RMSNorm's two-output forward and its gradient with the per-program gain partials, per batch shard.
    from pallas_kernels import rmsnorm as rn
    for op, fn in ((rn.FORWARD, rn.rms_norm_fwd_pallas_gpu), (rn.GRADIENT, rn.rms_norm_bwd_pallas_gpu)):
        def traced(*args, fn=fn, **kwargs):
            calls.append(("norm", args[0].shape))
            return fn(*args, interpret=True, **kwargs)
        op.impls["pallas_gpu"] = traced
    x, res, gain = arr(B, T, 24), arr(B, T, 24), 1.0 + 0.1 * arr(24)
    def norm(impl):
        def f(x, res, gain):
            s, y = rn.rms_norm(x, gain, residual=res, eps=1e-5, impl=impl, kernel_mesh=km)
            return s * y
        return f
    for a, b in zip(grads(norm("reference"), x, res, gain), grads(norm("pallas_gpu"), x, res, gain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert ("norm", (1, T, 24)) in calls, calls
    print("OK")
    """
)


def test_pallas_tpu_kernels_in_interpret_mode_run_per_shard_on_data_x_tensor(tmp_path):
    """pallas_tpu GCA and splash attention, and the GPU RMSNorm kernels (interpret mode) per shard of a
    (data=4, tensor=2) mesh: their gradients match the reference's, so batch rows and GQA head blocks are
    split consistently and the norm's gain gradient sums over the batch shards."""
    script = tmp_path / "pallas.py"
    script.write_text(PALLAS_SCRIPT)
    env = cli_env()
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


LOSS_HEAD_SCRIPT = textwrap.dedent(
    """
    import os, json, functools
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from drt_jax.losses import blocked_cross_entropy
    from drt_jax.train import mesh as M
    from drt_jax.train.config import DEFAULT_RULES, MeshConfig
    from pallas_kernels import logsumexp as lse

    shapes = []

    def grad_kernel(*args, **kw):
        shapes.append(args[0].shape)
        return lse.softmax_grad_pallas_gpu(*args, interpret=True, **kw)

    lse.SOFTMAX_GRADIENT.impls["pallas_gpu"] = grad_kernel
    lse.LOG_NORMALISER.impls["pallas_gpu"] = functools.partial(lse.logsumexp_pallas_gpu, interpret=True)
    mesh = M.make_mesh(MeshConfig(data=4, fsdp=1, tensor=2), jax.devices())
    km = M.kernel_mesh(mesh, DEFAULT_RULES)
    B, T, d, V = 8, 40, 16, 61
    kh, ke, kt = jax.random.split(jax.random.PRNGKey(0), 3)
    h = jax.random.normal(kh, (B, T, d))
    e = 0.3 * jax.random.normal(ke, (V, d))
    t = jax.random.randint(kt, (B, T), 0, V)
    w = jnp.where(jnp.arange(T) % 3 == 0, 0.0, 2.0) * jnp.ones((B, 1))

    def loss(h, e, impl, kernel_mesh):
        return blocked_cross_entropy(h, e, t, w, block_size=16, lse_impl=impl, kernel_mesh=kernel_mesh)[0]

    sharded = jax.device_put(h, M.batch_sharding(mesh, DEFAULT_RULES))
    got = jax.jit(jax.value_and_grad(functools.partial(loss, impl="pallas_gpu", kernel_mesh=km), argnums=(0, 1)))(sharded, e)
    want = jax.value_and_grad(functools.partial(loss, impl="reference", kernel_mesh=None), argnums=(0, 1))(h, e)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    print("RESULT", json.dumps({"kernel_batch": sorted({s[0] for s in shapes}), "batch_axes": list(km.batch)}))
    """
)


def test_the_loss_heads_gradient_kernel_runs_per_batch_shard_and_matches_the_reference(tmp_path):
    """The blocked loss with both loss-head kernels (interpreted) under a (data 4, tensor 2) kernel mesh:
    each kernel call sees a quarter of the batch, and the loss and gradients equal the unsharded reference's."""
    result = _run_on_eight_cpu_devices(tmp_path, LOSS_HEAD_SCRIPT, timeout=300)
    assert result == {"kernel_batch": [2], "batch_axes": ["data", "fsdp"]}, result
