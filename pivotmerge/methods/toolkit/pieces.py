"""Walking a flat tensor in fixed-size pieces, so a method's temporaries stay piece-sized."""

from __future__ import annotations

from typing import Iterator


# Pieces of a flat tensor that a method walks instead of the whole: 1M float32
# values (4 MiB), so temporaries stay piece-sized whatever the tensor's size, as
# in the engine's elementwise pieces. A power of two (a multiple of every SIMD
# width): torch's vectorised reductions then add each element's terms in the same
# order in a piece as in the whole tensor, so piecewise results keep their bits.
PIECE = 1 << 20


def flat_pieces(n: int) -> Iterator[slice]:
    """Consecutive ``PIECE``-sized slices covering ``n`` flat elements."""
    return (slice(start, start + PIECE) for start in range(0, n, PIECE))
