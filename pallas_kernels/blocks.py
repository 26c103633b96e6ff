"""Block sizes of the row-wise kernels (SwiGLU's gradient, the log-normaliser): they flatten the leading
dimensions into rows and need power-of-two blocks (Triton) that divide the rows and columns exactly."""

from __future__ import annotations


def largest_pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides n and is at most cap (1 for odd n)."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b
