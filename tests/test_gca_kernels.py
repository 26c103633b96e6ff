"""GCA kernels against the reference: output and all four gradients, fresh random inputs per check.

On CPU: pallas_gpu under the generic Pallas interpreter (outputs poisoned with NaN through aliased
buffers), pallas_tpu under the TPU interpreter (uninitialised memory = NaN) plus a real Mosaic TPU
lowering, and the dispatcher's logged fallback. The Triton kernel (and the compiled pallas_gpu) run
only where a GPU and jax_triton are present; on CPU the Triton wrapper runs against NumPy stand-ins of
its kernels (tests/triton_emulation.py). Shapes are tiny: the interpreters are slow.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import poison as poison_module
from pallas_kernels.gca import api, common_vjp
from pallas_kernels.gca.api import Unsupported, grouped_cross_attention
from pallas_kernels.gca.reference import gca_reference
from tests.gca_testing import Case, check_against_reference, make_inputs

ON_GPU = jax.default_backend() == "gpu"


@pytest.fixture
def poison():
    old = poison_module.POISON_OUTPUTS
    poison_module.POISON_OUTPUTS = True
    yield
    poison_module.POISON_OUTPUTS = old


def _assert_close(errs, tol, case, seed):
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{case} seed={seed} (GCA_TEST_SEED reproduces): errors {errs} over tol {tol}"


# K in {1, 8, 16}; Sm in {64, 128} and an odd small shape; GQA; empty slots; off-by-one on/off; fp32/bf16.
GPU_CASES = [
    Case(B=1, C=2, Sq=64, H=2, D=32, M=3, Sm=64, Hkv=2, K=1, dtype="float32", obo=True, empty=0.0),
    Case(B=1, C=3, Sq=16, H=4, D=32, M=4, Sm=128, Hkv=2, K=8, dtype="float32", obo=False),
    Case(B=2, C=2, Sq=16, H=2, D=32, M=5, Sm=64, Hkv=1, K=16, dtype="float32", obo=True),
    Case(B=1, C=3, Sq=16, H=2, D=32, M=4, Sm=15, Hkv=2, K=8, dtype="float32", obo=True),
    Case(B=1, C=2, Sq=16, H=2, D=32, M=3, Sm=128, Hkv=1, K=8, dtype="bfloat16", obo=False),
    Case(B=1, C=2, Sq=64, H=2, D=64, M=3, Sm=63, Hkv=2, K=8, dtype="bfloat16", obo=True),
    # Once out of memory at launch (or no answer in 200 s) for jax-triton on an H100: GQA 8/2, Sm=63, fp32.
    Case(B=1, C=5, Sq=64, H=8, D=64, M=11, Sm=63, Hkv=2, K=4, dtype="float32", obo=True),
]

TPU_CASES = [
    Case(B=1, C=2, Sq=16, H=2, D=32, M=3, Sm=64, Hkv=1, K=16, dtype="float32", obo=True),
    Case(B=1, C=2, Sq=16, H=1, D=32, M=2, Sm=128, Hkv=1, K=1, dtype="bfloat16", obo=False, empty=0.0),
    Case(B=1, C=2, Sq=16, H=2, D=32, M=3, Sm=15, Hkv=2, K=8, dtype="float32", obo=False),
]


@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_pallas_gpu_interpret(case, poison):
    from pallas_kernels.gca.pallas_gpu import gca_pallas_gpu_interpret

    errs, tol, seed = check_against_reference(gca_pallas_gpu_interpret, case)
    _assert_close(errs, tol, case, seed)


@pytest.mark.parametrize("case", TPU_CASES, ids=str)
def test_pallas_tpu_interpret(case):
    from jax.experimental.pallas import tpu as pltpu

    from pallas_kernels.gca.pallas_tpu import gca_pallas_tpu

    params = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")
    try:
        errs, tol, seed = check_against_reference(functools.partial(gca_pallas_tpu, interpret=params), case)
    finally:
        pltpu.reset_tpu_interpret_mode_state()
    _assert_close(errs, tol, case, seed)


@pytest.mark.parametrize(
    "case",
    [
        Case(B=1, C=4, Sq=64, H=12, D=64, M=4, Sm=63, Hkv=12, K=8, dtype="bfloat16"),  # the 133M model's GCA
        Case(B=2, C=3, Sq=16, H=4, D=32, M=5, Sm=15, Hkv=2, K=16, dtype="float32", obo=False),
    ],
    ids=str,
)
def test_pallas_tpu_lowers_for_tpu(case):
    """Mosaic's block rules are checked by the real TPU lowering, which runs on a CPU host."""
    from pallas_kernels.gca.pallas_tpu import gca_pallas_tpu

    q, k, v, idx, w, ct = make_inputs(case, 0)
    fn = functools.partial(gca_pallas_tpu, _force_lowering=True, softmax_off_by_one=case.obo)

    def loss(q, k, v, w):
        return jnp.sum(fn(q, k, v, idx, w).astype(jnp.float32) * ct.astype(jnp.float32))

    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).trace(q, k, v, w).lower(
        lowering_platforms=("tpu",)
    )
    assert lowered.as_text().count("tpu_custom_call") == 3  # forward, dq/dw, dk/dv


def test_dispatcher_falls_back_with_reason(caplog, monkeypatch):
    """A kernel that cannot take a shape (head dim 48) raises Unsupported; the dispatcher logs why
    and returns the reference's answer."""
    monkeypatch.setitem(api._REGISTRY, "pallas_gpu_interpret",
                        ("pallas_kernels.gca.pallas_gpu", "gca_pallas_gpu_interpret"))
    case = Case(B=1, C=2, Sq=8, H=2, D=48, M=2, Sm=8, Hkv=2, K=2)
    q, k, v, idx, w, _ = make_inputs(case, 1)
    with pytest.raises(Unsupported, match="head dim"):
        from pallas_kernels.gca.pallas_gpu import gca_pallas_gpu_interpret

        gca_pallas_gpu_interpret(q, k, v, idx, w)
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.gca.api"):
        out = grouped_cross_attention(q, k, v, idx, w, impl="pallas_gpu_interpret")
    assert "pallas_gpu_interpret" in caplog.text and "got 48" in caplog.text
    assert jnp.allclose(out, gca_reference(q, k, v, idx, w), atol=1e-6)


def test_dispatcher_backend_fallback_on_cpu(caplog):
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU fallback of the GPU/TPU kernels")
    case = Case(B=1, C=2, Sq=8, H=2, D=16, M=2, Sm=8, Hkv=2, K=2)
    q, k, v, idx, w, _ = make_inputs(case, 2)
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.gca.api"):
        for impl in ("pallas_gpu", "pallas_tpu", "triton"):
            out = grouped_cross_attention(q, k, v, idx, w, impl=impl)
            assert jnp.allclose(out, gca_reference(q, k, v, idx, w), atol=1e-6)
    for impl in ("pallas_gpu", "pallas_tpu", "triton"):
        assert f"GCA impl {impl!r} skipped" in caplog.text


def test_inverse_index():
    idx = jnp.array([[[2, -1, 0], [2, 2, 1]]], jnp.int32)  # B=1, C=2, K=3, M=4
    pairs, starts = common_vjp.inverse_index(idx, 4)
    assert starts.tolist() == [[0, 1, 2, 5, 5]]
    assert pairs[0, :5].tolist() == [2, 5, 0, 3, 4]  # pair = c*K + j, grouped by memory chunk


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (the compiled Triton lowering of pallas_gpu)")
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_pallas_gpu_compiled(case, poison):
    from pallas_kernels.gca.pallas_gpu import gca_pallas_gpu

    errs, tol, seed = check_against_reference(gca_pallas_gpu, case)
    tol = max(tol, 2e-5)  # fp32 on the GPU: IEEE dots, but exp and summation order differ
    _assert_close(errs, tol, case, seed)


def _triton_skip_reason():
    if not ON_GPU:
        return f"needs a CUDA GPU (backend is {jax.default_backend()})"
    from pallas_kernels.gca import triton_gpu

    if triton_gpu._IMPORT_ERROR is not None:
        return f"jax_triton / triton not importable: {triton_gpu._IMPORT_ERROR}"
    return None


@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_triton(case, poison):
    reason = _triton_skip_reason()
    if reason:
        pytest.skip(reason)
    from pallas_kernels.gca.triton_gpu import gca_triton

    errs, tol, seed = check_against_reference(gca_triton, case)
    _assert_close(errs, max(tol, 2e-5), case, seed)


# Non-power-of-two chunks (padded tiles), GQA, empty slots, off-by-one on and off.
EMULATED_CASES = [
    Case(B=2, C=3, Sq=7, H=4, D=16, M=4, Sm=5, Hkv=2, K=3, obo=True),
    Case(B=1, C=4, Sq=16, H=2, D=16, M=3, Sm=17, Hkv=1, K=2, obo=False),
]


@pytest.mark.parametrize("case", EMULATED_CASES, ids=str)
def test_triton_wrapper_with_emulated_launches_matches_reference(case, monkeypatch):
    """triton and jax_triton are GPU-only (and not in the CPU install), so the Triton path's JAX side runs
    here against NumPy kernels that follow the Triton programs over flat buffers (tests/triton_emulation.py):
    the layouts, grids, padding masks, metaparameters, base-2 scale, inverse index and dweights reduction.
    The Triton programs themselves compile and run only in test_triton on a GPU."""
    from pallas_kernels.gca import triton_gpu
    from tests.triton_emulation import emulated_launch

    monkeypatch.setattr(triton_gpu, "_IMPORT_ERROR", None)
    monkeypatch.setattr(triton_gpu, "_launch", emulated_launch)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    errs, tol, seed = check_against_reference(triton_gpu.gca_triton, case)
    _assert_close(errs, tol, case, seed)
