"""Grouped Cross-Attention: reference, kernels and the dispatcher."""

from pallas_kernels.gca.api import Unsupported, available_impls, grouped_cross_attention
from pallas_kernels.gca.reference import gca_reference

__all__ = ["Unsupported", "available_impls", "gca_reference", "grouped_cross_attention"]
