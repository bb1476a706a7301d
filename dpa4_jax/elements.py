"""Element symbols and the MPtrj type map."""

from __future__ import annotations

import functools

import numpy as np
from ase.data import atomic_numbers, chemical_symbols

# Z = 1..94 without Po, At, Rn, Fr, Ra: the 89 elements of the paper's MPtrj models.
MPTRJ_ELEMENTS: tuple[str, ...] = tuple(
    chemical_symbols[z] for z in range(1, 95) if chemical_symbols[z] not in ("Po", "At", "Rn", "Fr", "Ra")
)


def atomic_number(symbol: str) -> int:
    """Atomic number of an element symbol, with an error naming an unknown one."""
    if symbol not in atomic_numbers or symbol == "X":
        raise ValueError(f"unknown element symbol {symbol!r}")
    return atomic_numbers[symbol]


@functools.lru_cache(maxsize=32)
def type_lookup(type_map: tuple[str, ...]) -> np.ndarray:
    """``(119,)`` int64: the index of each atomic number in ``type_map``, -1 where absent: the one map from
    atomic numbers to type indices (model inputs and data statistics alike)."""
    lut = np.full(len(chemical_symbols), -1, dtype=np.int64)
    for t, symbol in enumerate(type_map):
        z = atomic_number(str(symbol))
        if lut[z] >= 0:
            raise ValueError(f"type_map lists {symbol!r} twice (entries {lut[z]} and {t})")
        lut[z] = t
    lut.flags.writeable = False
    return lut


def species_indices(numbers, type_map, name: str = "structure") -> np.ndarray:
    """``(N,)`` int32 type indices of atomic ``numbers`` in ``type_map``; an unknown element is an error naming
    the structure and the element."""
    numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
    types = type_lookup(tuple(type_map))[numbers]
    if (types < 0).any():
        missing = sorted(set(numbers[types < 0].tolist()))
        symbols = ", ".join(chemical_symbols[z] if 0 < z < len(chemical_symbols) else str(z) for z in missing)
        raise ValueError(f"{name}: element(s) {symbols} not in the model's type map "
                         f"({len(type_map)} elements: {', '.join(type_map[:12])}{', ...' if len(type_map) > 12 else ''})")
    return types.astype(np.int32)
