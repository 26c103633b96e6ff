"""pallas_kernels.dispatch.KernelOp: the order of candidates, the logged fallback, and which calls run per shard."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import pytest

from pallas_kernels import dispatch


def _op(reference_per_shard=True):
    def fast(x, scale=1.0):
        raise dispatch.Unsupported("fast takes no such call")

    return dispatch.KernelOp("toy", {"reference": lambda x, scale=1.0: x * scale, "fast": fast}, {"cpu": ("fast",)},
                             reference_per_shard=reference_per_shard)


def test_candidates_choose_and_a_logged_fallback(caplog):
    op = _op()
    assert op.candidates("auto") == ["fast", "reference"]
    assert op.candidates("reference") == ["reference"]
    assert op.choose("auto", jnp.ones(3), scale=2.0) == ("reference", ["fast: fast takes no such call"])
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.dispatch"):
        out = op("fast", (jnp.ones(3),), ((None,),), (None,), scale=2.0)
    assert out.tolist() == [2.0, 2.0, 2.0]
    assert "toy impl 'fast' skipped: fast takes no such call; falling back" in caplog.text
    with pytest.raises(ValueError, match="unknown toy impl 'slow'; choose one of auto, reference, fast"):
        op.candidates("slow")


@pytest.mark.parametrize("per_shard", [True, False])
def test_a_reference_left_to_xla_gets_no_kernel_mesh(per_shard, monkeypatch):
    seen = []
    monkeypatch.setattr(dispatch.per_shard, "run", lambda fn, args, layouts, out, mesh: seen.append(mesh) or fn(*args))
    _op(per_shard)("reference", (jnp.ones(2),), ((None,),), (None,), kernel_mesh="the mesh")
    assert seen == ["the mesh" if per_shard else None]
