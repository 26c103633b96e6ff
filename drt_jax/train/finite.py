"""The guard that keeps a non-finite state out of every checkpoint: each step's loss, gradient norm
and parameter norm, computed on the device by the train step, are checked on the host one step behind."""

from __future__ import annotations

import math

import jax


def non_finite(loss: float, grad_norm: float, param_norm: float) -> str | None:
    """Which of a step's loss, gradient and parameters hold a NaN or an infinity (None: all finite).

    A norm is finite exactly when every element is, so the step's norms cover every gradient and
    parameter without another pass over them."""
    bad = [name for name, v in (("loss", loss), ("gradients", grad_norm), ("parameters", param_norm)) if not math.isfinite(v)]
    return ", ".join(bad) or None


class FiniteWatch:
    """Checks every step's loss and norms (computed on device by the step) one step behind.

    Fetching step s's three scalars after step s+1 is dispatched keeps the device busy while the host
    waits; flush() checks the newest step too and runs before every save and log, so a non-finite
    state is never checkpointed and the error names the first bad step.
    """

    def __init__(self):
        self._pending = None

    def push(self, step: int, metrics: dict, last_saved: int | None) -> None:
        previous = self._pending
        self._pending = (step, (metrics["loss"], metrics["grad_norm"], metrics["param_norm"]), last_saved)
        if previous is not None:
            self._check(*previous)

    def flush(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._check(*pending)

    @staticmethod
    def _check(step: int, values, last_saved: int | None) -> None:
        loss, grad_norm, param_norm = (float(v) for v in jax.device_get(values))
        bad = non_finite(loss, grad_norm, param_norm)
        if bad:
            kept = f"the newest checkpoint is step {last_saved}" if last_saved is not None else "no checkpoint was saved"
            raise FloatingPointError(
                f"non-finite {bad} at step {step} (loss {loss}, gradient norm {grad_norm}, parameter norm {param_norm}); "
                f"not saved, {kept}; lower optim.peak_lr or check the data"
            )
