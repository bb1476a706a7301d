"""A small demo data set the project makes itself with ASE's EMT calculator.

Perturbed and strained fcc supercells of Cu, Au, Al, Ni and random binary
alloys of them, 4-32 atoms, labelled with EMT energy, forces and stress.
EMT is a toy potential: this data is for demos, tests and smoke runs, not for
physics.
"""

from __future__ import annotations

import os

import numpy as np

from .frame import Frame

__all__ = ["make_emt_dataset", "write_extxyz", "DEMO_ELEMENTS"]

DEMO_ELEMENTS = ("Al", "Ni", "Cu", "Au")

# (cell kind, repeat) -> atoms: primitive fcc has 1 atom, cubic fcc 4.
_SUPERCELLS = (
    ("cubic", (1, 1, 1)),  # 4
    ("primitive", (2, 2, 2)),  # 8
    ("cubic", (2, 1, 1)),  # 8
    ("primitive", (3, 2, 2)),  # 12
    ("cubic", (2, 2, 1)),  # 16
    ("primitive", (3, 3, 2)),  # 18
    ("primitive", (3, 3, 3)),  # 27
    ("cubic", (2, 2, 2)),  # 32
)


def make_emt_dataset(n_frames: int, seed: int = 0) -> list[Frame]:
    """``n_frames`` EMT-labelled frames, deterministic for ``seed``.

    Each frame: an fcc supercell (4-32 atoms) of one of Al, Ni, Cu, Au
    (about 60 %) or a random binary alloy of two of them (random composition,
    Vegard lattice constant), strained by a random symmetric strain with
    components uniform in ±4 %, then every atom displaced by a Gaussian with a
    per-frame sigma uniform in [0.05, 0.15] Å.  Labels: energy (eV), forces
    (eV/Å) and the virial (eV) from EMT's stress.
    """
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.data import atomic_numbers, reference_states

    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    rng = np.random.default_rng(seed)
    a0 = {el: reference_states[atomic_numbers[el]]["a"] for el in DEMO_ELEMENTS}
    calc = EMT()
    frames = []
    for i in range(n_frames):
        kind, rep = _SUPERCELLS[rng.integers(len(_SUPERCELLS))]
        if rng.random() < 0.6:
            els = [DEMO_ELEMENTS[rng.integers(len(DEMO_ELEMENTS))]]
        else:
            els = list(rng.choice(DEMO_ELEMENTS, size=2, replace=False))
        atoms = bulk("Cu", "fcc", a=1.0, cubic=(kind == "cubic")).repeat(rep)
        n = len(atoms)
        if len(els) == 1:
            symbols = [els[0]] * n
            a = a0[els[0]]
        else:
            n_b = int(rng.integers(1, n)) if n > 1 else 0
            symbols = np.array([els[0]] * n, dtype=object)
            symbols[rng.choice(n, size=n_b, replace=False)] = els[1]
            symbols = list(symbols)
            x = n_b / n
            a = (1 - x) * a0[els[0]] + x * a0[els[1]]
        atoms.set_chemical_symbols(symbols)
        atoms.set_cell(atoms.cell * a, scale_atoms=True)
        eps = rng.uniform(-0.04, 0.04, size=(3, 3))
        eps = 0.5 * (eps + eps.T)
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        sigma = rng.uniform(0.05, 0.15)
        atoms.positions = atoms.positions + rng.normal(0.0, sigma, size=(n, 3))
        atoms.calc = calc
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        stress = atoms.get_stress(voigt=False)
        atoms.calc = None
        frames.append(
            Frame.from_atoms(
                atoms,
                energy=energy,
                forces=forces,
                stress=stress,
                source=f"emt-demo(seed={seed}):{i}",
            )
        )
    return frames


def _fmt(x) -> str:
    return repr(float(x))  # shortest string that round-trips exactly


def write_extxyz(
    frames,
    path,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
) -> None:
    """Write frames as extended XYZ that ASE (and :func:`read_extxyz` with the
    same keys) reads back: full float precision (positions, energy and forces
    round-trip exactly; the stress ``-virial/V`` is written as 9 components,
    ASE sign, eV/Å^3, so the virial comes back to rounding error).  Periodic
    frames get ``Lattice``; all frames get ``pbc``; a frame's total charge and
    spin multiplicity, when given, the info keys ``charge`` and ``spin``.
    """
    from ase.data import chemical_symbols

    path = os.fspath(path)
    with open(path, "w") as fh:
        for fr in frames:
            header = []
            if fr.pbc.any():
                header.append('Lattice="' + " ".join(_fmt(v) for v in fr.cell.reshape(-1)) + '"')
            props = "species:S:1:pos:R:3"
            if fr.forces is not None:
                props += f":{forces_key}:R:3"
            header.append(f"Properties={props}")
            if fr.energy is not None:
                header.append(f"{energy_key}={_fmt(fr.energy)}")
            if fr.virial is not None:
                # 3x3 written column-major, as ASE writes its 3x3 keys.
                header.append(f'{stress_key}="' + " ".join(_fmt(v) for v in fr.stress.reshape(-1, order="F")) + '"')
            header += [f"{key}={getattr(fr, key)}" for key in ("charge", "spin") if getattr(fr, key) is not None]
            header.append('pbc="' + " ".join("T" if b else "F" for b in fr.pbc) + '"')
            fh.write(f"{fr.natoms}\n{' '.join(header)}\n")
            for j in range(fr.natoms):
                cols = [chemical_symbols[fr.numbers[j]], *map(_fmt, fr.positions[j])]
                if fr.forces is not None:
                    cols += list(map(_fmt, fr.forces[j]))
                fh.write(" ".join(cols) + "\n")
