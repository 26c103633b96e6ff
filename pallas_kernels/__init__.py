"""Fused kernels for DRT. Each op is a reference (the oracle), kernels per backend and a dispatcher."""

from pallas_kernels.gca import gca_reference, grouped_cross_attention

__all__ = ["gca_reference", "grouped_cross_attention"]
