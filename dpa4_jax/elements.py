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
