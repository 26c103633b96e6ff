"""Synthetic tasks: needle-in-a-haystack (single / multi-key / 2-hop) for evaluation and fine-tuning."""

from drt_jax.tasks.niah import (
    KINDS,
    NiahSample,
    NiahSource,
    NiahTask,
    TaskError,
    make_niah_factory,
    register_niah_tasks,
    score_exact,
)

__all__ = ["KINDS", "NiahSample", "NiahSource", "NiahTask", "TaskError", "make_niah_factory", "register_niah_tasks", "score_exact"]
