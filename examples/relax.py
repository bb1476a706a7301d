"""Relax a strained, rattled Cu3Au crystal, positions and cell together (ASE ``FrechetCellFilter`` + ``FIRE``).

    python examples/relax.py

Uses the demo model of ``python train.py --config configs/demo.yaml`` (runs/demo) when present, else a
randomly initialised one (constant per-element energies: nothing to relax).
"""

from pathlib import Path

import numpy as np
from ase.build import bulk
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE
from ase.units import GPa

from dpa4_jax.calculator import DPA4Calculator

ROOT = Path(__file__).resolve().parents[1]


def load_calculator():
    if (ROOT / "runs/demo").is_dir():
        return DPA4Calculator.from_checkpoint(ROOT / "runs/demo")
    print("runs/demo not found: random demo model (train one with `python train.py --config configs/demo.yaml`)")
    return DPA4Calculator.from_config(ROOT / "configs/demo.yaml")


def report(label, atoms):
    stress = np.abs(atoms.get_stress()).max() / GPa
    print(f"{label}: E {atoms.get_potential_energy():+.4f} eV, max |F| {np.abs(atoms.get_forces()).max():.4f} eV/A, "
          f"max |stress| {stress:.3f} GPa, cell {atoms.cell.lengths().round(3)} A")


def main():
    atoms = bulk("Cu", "fcc", a=3.75, cubic=True) * (2, 2, 2)  # 32 atoms
    atoms.numbers[::4] = 79  # Cu3Au (L1_2 ordering)
    atoms.set_cell(atoms.cell.array @ np.diag([1.03, 0.98, 1.0]), scale_atoms=True)  # strain +3% / -2%
    atoms.rattle(0.05, seed=0)
    atoms.calc = load_calculator()
    report("before", atoms)

    optimizer = FIRE(FrechetCellFilter(atoms), logfile=None)
    optimizer.run(fmax=0.01, steps=300)
    report("after ", atoms)
    print(f"{optimizer.nsteps} FIRE steps, cell angles {atoms.cell.angles().round(2)} deg, "
          f"{atoms.calc.compilations} compilation(s) of the model")


if __name__ == "__main__":
    main()
