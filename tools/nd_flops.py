"""Flop counts behind docs/spectral.md Sec. 2: the banded Cholesky certificate against nested dissection.

The certificate factors ``mu I - T^T T`` on an ``n x n`` grid of ``c``-vectors whose rows couple
within ``B`` pixels (``B = 2`` for a 3x3 stride-1 conv). Banded by image rows it costs
``n (1/3 + B + B^2 + 1) (c n)^3`` flops (:func:`sepconv.spectral.certify.certificate_cost`). Nested
dissection (George, SIAM J. Numer. Anal. 10(2), 1973) splits each region by a separator ``B`` pixels
wide and eliminates it in a dense front with the region's halo (the nodes outside it within ``B``):
``s^3/3 + s^2 h + s h^2`` flops for ``s`` separator and ``h`` halo unknowns (multifrontal count).

    python tools/nd_flops.py    # one line per layer size of docs/spectral.md
"""

from __future__ import annotations

import torch

from sepconv.spectral import ConvSpec
from sepconv.spectral.certify import certificate_cost


def banded(n: int, c: int) -> float:
    """The banded certificate's flops for a ``c -> c`` 3x3 zero-padded conv at ``n x n`` (as the engine counts)."""
    return certificate_cost(torch.zeros(c, c, 3, 3, dtype=torch.float64), ConvSpec((n, n), 1, 1))[0]


def nested(n: int, c: int, B: int = 2, leaf: int = 4) -> float:
    total = 0.0

    def front(s: int, h: int) -> float:
        return s ** 3 / 3 + s * s * h + s * h * h

    def region(r0: int, r1: int, c0: int, c1: int) -> None:
        nonlocal total
        h, w = r1 - r0, c1 - c0
        halo = (min(n, r1 + B) - max(0, r0 - B)) * (min(n, c1 + B) - max(0, c0 - B)) - h * w
        if h * w <= leaf:
            total += front(h * w * c, halo * c)
            return
        if h >= w:  # split the longer side by a separator of B rows (or columns)
            m = r0 + (h - B) // 2
            region(r0, m, c0, c1)
            region(m + B, r1, c0, c1)
            total += front(B * w * c, halo * c)
        else:
            m = c0 + (w - B) // 2
            region(r0, r1, c0, m)
            region(r0, r1, m + B, c1)
            total += front(B * h * c, halo * c)

    region(0, n, 0, n)
    return total


if __name__ == "__main__":
    for c, n in [(16, 32), (32, 16), (64, 8), (64, 32), (128, 16), (256, 8), (512, 4), (512, 7), (64, 56),
                 (128, 28), (256, 14)]:
        b = banded(n, c)
        d = min(nested(n, c, leaf=leaf) for leaf in (4, 16, 64, 256))
        print(f"{c}->{c} @{n}x{n}: banded {b:.2e}, nested dissection {d:.2e}, ratio {b / d:.1f}")
