"""Langevin molecular dynamics of a Cu-Au alloy at 600 K with ASE.

    python examples/langevin.py [--steps 100]

Uses the demo model of ``python train.py --config configs/demo.yaml`` (runs/demo) when present, else a
randomly initialised one (constant per-element energies: zero forces, the atoms only feel the thermostat).
"""

import argparse
import time
from pathlib import Path

import numpy as np
from ase import units
from ase.build import bulk
from ase.constraints import FixCom
from ase.md.langevin import Langevin

from dpa4_jax.calculator import DPA4Calculator

ROOT = Path(__file__).resolve().parents[1]


def load_calculator(**kwargs):
    if (ROOT / "runs/demo").is_dir():
        return DPA4Calculator.from_checkpoint(ROOT / "runs/demo", **kwargs)
    print("runs/demo not found: random demo model (train one with `python train.py --config configs/demo.yaml`)")
    return DPA4Calculator.from_config(ROOT / "configs/demo.yaml", **kwargs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()

    atoms = bulk("Cu", "fcc", a=3.7, cubic=True) * (3, 3, 3)  # 108 atoms
    rng = np.random.default_rng(0)
    atoms.numbers[rng.choice(len(atoms), size=len(atoms) // 4, replace=False)] = 79  # random Cu3Au
    # Padded sizes 30% above the first structure's: thermal motion then rarely forces a recompilation.
    atoms.calc = load_calculator(capacity_multiplier=1.3)
    kT = 600 * units.kB
    atoms.set_momenta(rng.standard_normal((len(atoms), 3)) * np.sqrt(atoms.get_masses()[:, None] * kT))
    atoms.set_constraint(FixCom())  # no drift of the centre of mass
    dyn = Langevin(atoms, timestep=2 * units.fs, temperature_K=600, friction=0.01 / units.fs, fixcm=False, rng=rng)
    print(f"{atoms.get_chemical_formula()}: Langevin at 600 K, dt 2 fs, {args.steps} steps")

    def report():
        e_pot, e_kin = atoms.get_potential_energy(), atoms.get_kinetic_energy()
        print(f"  step {dyn.nsteps:4d}  T {atoms.get_temperature():6.1f} K  E_pot {e_pot / len(atoms):+.5f} eV/atom  "
              f"E_tot {(e_pot + e_kin) / len(atoms):+.5f} eV/atom")

    dyn.attach(report, interval=max(args.steps // 10, 1))
    start = time.perf_counter()
    dyn.run(args.steps)
    elapsed = time.perf_counter() - start
    print(f"{args.steps} steps in {elapsed:.1f} s ({args.steps / elapsed:.1f} steps/s, first step compiles), "
          f"{atoms.calc.compilations} compilation(s) of the model")


if __name__ == "__main__":
    main()
