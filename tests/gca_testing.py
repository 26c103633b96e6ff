"""Shared helpers for checking GCA kernels against `gca_reference` (used by tests and bench/gca_kernels.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gca.reference import gca_reference

TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}


@dataclass(frozen=True)
class Case:
    B: int
    C: int
    Sq: int
    H: int
    D: int
    M: int
    Sm: int
    Hkv: int
    K: int
    dtype: str = "float32"
    obo: bool = True
    empty: float = 0.25  # fraction of empty (-1) slots

    def __str__(self):
        return (f"B{self.B}C{self.C}Sq{self.Sq}H{self.H}D{self.D}M{self.M}Sm{self.Sm}Hkv{self.Hkv}K{self.K}"
                f"-{self.dtype}-obo{int(self.obo)}-empty{self.empty}")


def fresh_seed() -> int:
    """A new seed per check (GCA_TEST_SEED reproduces a failure)."""
    env = os.environ.get("GCA_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


def make_inputs(case: Case, seed: int):
    dt = jnp.dtype(case.dtype)
    ks = jax.random.split(jax.random.key(seed), 7)
    q = jax.random.normal(ks[0], (case.B, case.C, case.Sq, case.H, case.D), jnp.float32).astype(dt)
    k = jax.random.normal(ks[1], (case.B, case.M, case.Sm, case.Hkv, case.D), jnp.float32).astype(dt)
    v = jax.random.normal(ks[2], (case.B, case.M, case.Sm, case.Hkv, case.D), jnp.float32).astype(dt)
    idx = jax.random.randint(ks[3], (case.B, case.C, case.K), 0, case.M, jnp.int32)
    if case.empty:
        idx = jnp.where(jax.random.uniform(ks[4], idx.shape) < case.empty, -1, idx)
        idx = idx.at[0, 0, :].set(-1)  # one query chunk with every slot empty
        if case.C > 1:
            idx = idx.at[0, 1, 0].set(0)  # and a non-empty one
    w = jax.random.uniform(ks[5], (case.B, case.C, case.K), jnp.float32, 0.1, 1.0)
    ct = jax.random.normal(ks[6], q.shape, jnp.float32).astype(dt)
    return q, k, v, idx, w, ct


def out_and_grads(fn, q, k, v, idx, w, ct, obo):
    """(out, (dq, dk, dv, dw)) under one jit, cotangent ct."""

    @jax.jit
    def run(q, k, v, w, ct):
        out, vjp = jax.vjp(lambda q, k, v, w: fn(q, k, v, idx, w, softmax_off_by_one=obo), q, k, v, w)
        return out, vjp(ct)

    return run(q, k, v, w, ct)


def rel_err(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")  # NaN / inf (e.g. an unwritten poisoned element) never passes
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_against_reference(fn, case: Case, seed: int | None = None):
    """Returns (errors dict, tolerance, seed). The reference runs on fp32 copies of the inputs."""
    seed = fresh_seed() if seed is None else seed
    q, k, v, idx, w, ct = make_inputs(case, seed)
    out, grads = out_and_grads(fn, q, k, v, idx, w, ct, case.obo)
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):  # no tf32 in the oracle on GPUs
        r_out, r_grads = out_and_grads(gca_reference, up(q), up(k), up(v), idx, w, up(ct), case.obo)
    errs = {"out": rel_err(out, r_out)}
    for name, g, r in zip(("dq", "dk", "dv", "dw"), grads, r_grads, strict=True):
        errs[name] = rel_err(g, r)
    # dweights of empty slots must be exactly 0.
    dw = np.asarray(grads[3], np.float32)
    if np.any(dw[np.asarray(idx) < 0] != 0):
        errs["dw_empty"] = float("inf")
    return errs, TOL[jnp.dtype(case.dtype)], seed
