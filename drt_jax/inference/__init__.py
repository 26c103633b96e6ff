"""Incremental inference: ring-buffer KV caches, chunk memory (optionally offloaded), prefill, decode, sampling."""

from drt_jax.inference.engine import InferenceEngine, InferenceError
from drt_jax.inference.memory import DeviceState, InferenceState
from drt_jax.inference.offload import HostMemory
from drt_jax.inference.sampling import generate, sample_logits

__all__ = [
    "DeviceState",
    "HostMemory",
    "InferenceEngine",
    "InferenceError",
    "InferenceState",
    "generate",
    "sample_logits",
]
