"""drt-jax: DRT (Differentiable Retrieval-based Transformer) and Grouped Cross-Attention in JAX."""

from drt_jax.config import ConfigError, ModelConfig
from drt_jax.model import DRT, parameter_count

__all__ = ["DRT", "ConfigError", "ModelConfig", "parameter_count"]
__version__ = "0.1.0"
