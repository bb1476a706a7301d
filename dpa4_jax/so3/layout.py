"""Index layouts of SO(3) coefficients.

Node features use the packed layout ``(l, m) -> l*l + l + m``. Inside the SO(2)
convolution, edge features live in the local frame of the edge and are kept in
the reference's *m-major* layout truncated at ``mmax`` (paper Eq. 57-58)::

    [m=0: l=0..L | m=-1: l=1..L | m=+1: l=1..L | m=-2: l=2..L | m=+2: l=2..L | ...]

Only rows of the same |m| are ever coupled by an SO(2)-equivariant map; the local
features are kept as one array per |m| (``wigner.rotate_in``).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


def packed_index(l: int, m: int) -> int:
    """Position of (l, m) in the packed layout."""
    return l * l + l + m


def degree_of_packed(lmax: int) -> np.ndarray:
    """``(lmax+1)**2`` int array: the degree l of every packed coefficient."""
    return np.repeat(np.arange(lmax + 1), [2 * l + 1 for l in range(lmax + 1)])


@dataclasses.dataclass(frozen=True)
class MMajorLayout:
    """The m-major truncated layout for given ``lmax`` and ``mmax``."""

    lmax: int
    mmax: int

    def __post_init__(self):
        if not 0 <= self.mmax <= self.lmax:
            raise ValueError(f"need 0 <= mmax <= lmax, got lmax={self.lmax}, mmax={self.mmax}")

    @functools.cached_property
    def ml_pairs(self) -> tuple[tuple[int, int], ...]:
        """(m, l) of every row, in layout order."""
        rows = [(0, l) for l in range(self.lmax + 1)]
        for m in range(1, self.mmax + 1):
            rows += [(-m, l) for l in range(m, self.lmax + 1)]
            rows += [(m, l) for l in range(m, self.lmax + 1)]
        return tuple(rows)

    @functools.cached_property
    def packed(self) -> np.ndarray:
        """``(dim,)`` packed index of every row."""
        return np.array([packed_index(l, m) for m, l in self.ml_pairs])

    @functools.cached_property
    def degree_rescale(self) -> tuple[float, ...]:
        """Factor per degree l = 0..lmax applied after rotating back to the global frame.

        Degrees l > mmax keep only 2*mmax+1 of their 2l+1 components; the
        reference rescales them by ``sqrt((2l+1)/(2*mmax+1))`` (paper Eq. 59).
        """
        return tuple(float(np.sqrt((2 * l + 1) / (2 * self.mmax + 1))) if l > self.mmax else 1.0
                     for l in range(self.lmax + 1))
