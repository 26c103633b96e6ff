"""Step metrics read behind the device, and the guard that keeps non-finite states out of checkpoints.

Every step's metrics go into a small record on the device (one jitted update, no host transfer): the
newest step's scalars, the task diagnostics summed over the logging interval, and the first step whose
loss, gradient norm or parameter norm was not finite. At a logging step the record is copied to the host
asynchronously and read one step later, when the device is already running the next step, so the
host never waits for the device except before a checkpoint (`check`), where it must.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.train.step import diagnostic_means


def non_finite(loss: float, grad_norm: float, param_norm: float) -> str | None:
    """Which of a step's loss, gradient and parameters hold a NaN or an infinity (None: all finite).

    A norm is finite exactly when every element is, so the step's norms cover every gradient and
    parameter without another pass over them."""
    bad = [name for name, v in (("loss", loss), ("gradients", grad_norm), ("parameters", param_norm)) if not math.isfinite(v)]
    return ", ".join(bad) or None


@jax.jit
def _update(record, metrics, step):
    """record, one step's metrics (with optional "diagnostics" sums), that step's number -> record."""
    watched = jnp.stack([metrics["loss"], metrics["grad_norm"], metrics["param_norm"]]).astype(jnp.float32)
    first = (record["bad_step"] < 0) & ~jnp.all(jnp.isfinite(watched))
    diag = metrics.get("diagnostics", {})
    return {
        "last": {k: v for k, v in metrics.items() if k != "diagnostics"},
        "diag": jax.tree.map(jnp.add, record["diag"], diag) if diag else record["diag"],
        "bad_step": jnp.where(first, step, record["bad_step"]),
        "bad_values": jnp.where(first, watched, record["bad_values"]),
    }


def _fresh(record):
    """The record at the start of a logging interval: no diagnostics summed, the bad step kept."""
    return {**record, "diag": jax.tree.map(jnp.zeros_like, record["diag"])}


class StepLogger:
    """Keeps the device-side record and writes a row (metrics.jsonl, TensorBoard, progress bar) per
    logging step, read one step behind.

    on_row(step, row) gets each row's host values (loss, diagnostics, tokens_per_s, mfu).
    """

    def __init__(self, *, tokens_per_step: int, flops_per_step: float, peak_flops: float | None, on_row):
        self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak_flops
        self.on_row = on_row
        self._record = None
        self._pending = None  # (step, record snapshot, steps since the previous row)
        self._steps_since = 0
        self._t_last = None
        self.last_saved: int | None = None
        self.first_loss = self.last_loss = self.tokens_per_s = self.mfu = None

    def push(self, step: int, metrics: dict, log: bool) -> None:
        """After step `step` was dispatched: fold its metrics in; on a logging step, start reading them.
        Reads the previous logging step's row first (the device has finished it by now, or will soon:
        the current step is queued behind it)."""
        if self._record is None:
            self._record = {"last": {k: v for k, v in metrics.items() if k != "diagnostics"},
                            "diag": jax.tree.map(jnp.zeros_like, metrics.get("diagnostics", {})),
                            "bad_step": jnp.int32(-1), "bad_values": jnp.zeros(3, jnp.float32)}
        self._record = _update(self._record, metrics, step)
        self._steps_since += 1
        self.flush()
        if log:
            snapshot = self._record
            for leaf in jax.tree.leaves(snapshot):
                leaf.copy_to_host_async()
            self._pending = (step, snapshot, self._steps_since)
            self._steps_since = 0
            self._record = _fresh(snapshot)

    def flush(self) -> None:
        """Writes the pending row, if any (waits for its step)."""
        if self._pending is None:
            return
        step, snapshot, steps = self._pending
        self._pending = None
        host = jax.device_get(snapshot)
        self._raise_if_bad(host)
        now = time.time()
        if self._t_last is not None and steps:
            dt = (now - self._t_last) / steps
            self.tokens_per_s = self.tokens_per_step / dt
            self.mfu = self.flops_per_step / dt / self.peak if self.peak else None
        self._t_last = now
        row = {k: float(v) for k, v in host["last"].items()}
        if host["diag"]:
            row.update(diagnostic_means(host["diag"]))
        self.last_loss = row["loss"]
        if self.first_loss is None:
            self.first_loss = row["loss"]
        self.on_row(step, {**row, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu})

    def check(self) -> None:
        """Raises FloatingPointError if any step so far was not finite (waits for the newest step).
        Runs before every checkpoint, so a non-finite state is never saved."""
        self.flush()
        if self._record is not None:
            self._raise_if_bad(jax.device_get({k: self._record[k] for k in ("bad_step", "bad_values")}))

    def _raise_if_bad(self, host) -> None:
        bad_step = int(host["bad_step"])
        if bad_step < 0:
            return
        loss, grad_norm, param_norm = (float(v) for v in np.asarray(host["bad_values"]))
        kept = f"the newest checkpoint is step {self.last_saved}" if self.last_saved is not None else "no checkpoint was saved"
        raise FloatingPointError(
            f"non-finite {non_finite(loss, grad_norm, param_norm)} at step {bad_step} (loss {loss}, gradient norm "
            f"{grad_norm}, parameter norm {param_norm}); not saved, {kept}; lower optim.peak_lr or check the data"
        )
