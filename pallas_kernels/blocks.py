"""Block sizes of the Triton-lowered kernels, whose blocks are powers of two. The row-wise kernels
(SwiGLU's gradient, RMSNorm, the log-normaliser) flatten the leading dimensions into rows and take
blocks that divide the rows exactly; a dimension no power of two divides is padded to the next one
and masked (GCA's chunks, RMSNorm's width)."""

from __future__ import annotations


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def largest_pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides n and is at most cap (1 for odd n)."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b
