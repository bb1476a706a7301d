"""Data statistics: the per-element energy bias.

As DeePMD-kit does (``deepmd/utils/out_stat.py``, ``compute_stats_from_redu``),
the bias ``b`` solves the least-squares problem ``min ||C b - E||`` where
``C[f, t]`` counts the atoms of type ``t`` in frame ``f`` and ``E[f]`` is the
frame's total energy (``numpy.linalg.lstsq`` with ``rcond``; minimum-norm
solution when ``C`` is rank deficient, e.g. water where n_H = 2 n_O in every
frame).  Types absent from the data get exactly 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from dpa4_jax.elements import type_lookup

from .frame import Frame, FrameError

__all__ = ["type_counts", "fit_energy_bias", "numbers_to_types"]


def numbers_to_types(numbers: np.ndarray, type_map: Sequence[str], source: str = "") -> np.ndarray:
    """Atomic numbers -> type indices in ``type_map`` (:func:`dpa4_jax.elements.type_lookup`); an unknown
    element is a :class:`FrameError` naming the element and the frame."""
    from ase.data import chemical_symbols

    numbers = np.asarray(numbers, dtype=np.int64)
    types = type_lookup(tuple(type_map))[numbers]
    if (types < 0).any():
        z = int(numbers[np.argmax(types < 0)])
        raise FrameError(
            f"{source or '<frame>'}: element {chemical_symbols[z]} (Z={z}) is not in type_map {list(type_map)}"
        )
    return types


def type_counts(frames: Iterable[Frame], type_map: Sequence[str], require_energy: bool = False):
    """(counts (nframes, ntypes) float64, energies (nframes,) or None entries).

    With ``require_energy=True`` frames without an energy are skipped.
    """
    ntypes = len(type_map)
    rows, energies = [], []
    for fr in frames:
        if require_energy and fr.energy is None:
            continue
        types = numbers_to_types(fr.numbers, type_map, fr.source)
        rows.append(np.bincount(types, minlength=ntypes))
        energies.append(fr.energy)
    counts = np.array(rows, dtype=np.float64).reshape(len(rows), ntypes)
    return counts, energies


def fit_energy_bias(frames: Iterable[Frame], type_map: Sequence[str], rcond: float | None = None,
                    fixed: Mapping[int, float] | None = None) -> np.ndarray:
    """Per-element energy bias (eV/atom), shape ``(len(type_map),)``.

    Least squares of frame energies on per-element atom counts (DeePMD-kit's
    ``compute_stats_from_redu``; ``fixed`` maps type indices to assigned values, its
    ``assigned_bias``: those types keep them and the others are fitted to the rest of
    the energy).  Frames without an energy are skipped; elements absent from the
    (labelled) frames and not fixed get 0.
    Raises if an element of a frame is not in ``type_map`` (naming both) or if
    no frame has an energy.
    """
    counts, energies = type_counts(frames, type_map, require_energy=True)
    if counts.shape[0] == 0:
        raise ValueError("fit_energy_bias: no frame has an energy label")
    energies = np.asarray(energies, dtype=np.float64)
    bias = np.zeros(len(type_map), dtype=np.float64)
    is_fixed = np.zeros(len(type_map), bool)
    for t, value in (fixed or {}).items():
        bias[t], is_fixed[t] = value, True
    free = (counts.sum(axis=0) > 0) & ~is_fixed
    if free.any():
        sol, *_ = np.linalg.lstsq(counts[:, free], energies - counts @ bias, rcond=rcond)
        bias[free] = sol
    return bias
