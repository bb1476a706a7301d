"""Element symbols and the MPtrj type map."""

from __future__ import annotations

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


def species_indices(numbers, type_map, name: str = "structure"):
    """Type indices of atomic ``numbers`` in ``type_map``; an unknown element is an error naming it."""
    import numpy as np

    lookup = {atomic_numbers[s]: i for i, s in enumerate(type_map)}
    numbers = np.asarray(numbers).reshape(-1)
    missing = sorted({int(z) for z in numbers if int(z) not in lookup})
    if missing:
        symbols = ", ".join(chemical_symbols[z] if 0 < z < len(chemical_symbols) else str(z) for z in missing)
        raise ValueError(f"{name}: element(s) {symbols} not in the model's type map "
                         f"({len(type_map)} elements: {', '.join(type_map[:12])}{', ...' if len(type_map) > 12 else ''})")
    return np.array([lookup[int(z)] for z in numbers], dtype=np.int32)
