"""JAX-MD NVT (Nose-Hoover chain) of a 1,000-atom copper crystal, the whole MD step jitted under ``lax.scan``.

    python examples/jax_md_nvt.py [--steps 30] [--chunk 10]

Uses the demo model of ``python train.py --config configs/demo.yaml`` (runs/demo) when present, else a
randomly initialised one (constant per-element energies: zero forces, the atoms move freely).
"""

import argparse
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
from ase import units
from ase.build import bulk
from jax_md import quantity, simulate, space

from dpa4_jax import jax_md as djm
from dpa4_jax.calculator import DPA4Calculator

ROOT = Path(__file__).resolve().parents[1]
# JAX-MD sums kinetic energies in float64, which JAX (without x64) truncates to float32 with a warning.
warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")


def load_calculator():
    if (ROOT / "runs/demo").is_dir():
        return DPA4Calculator.from_checkpoint(ROOT / "runs/demo")
    print("runs/demo not found: random demo model (train one with `python train.py --config configs/demo.yaml`)")
    return DPA4Calculator.from_config(ROOT / "configs/demo.yaml")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--chunk", type=int, default=10, help="steps per jitted lax.scan")
    args = parser.parse_args()

    calc = load_calculator()
    atoms = bulk("Cu", "fcc", a=3.61) * (10, 10, 10)  # 1,000 atoms in a triclinic (primitive fcc) cell
    positions, box, species = djm.from_atoms(atoms, calc.config.type_map)  # fractional positions
    print(f"{len(atoms)} Cu atoms, cell {atoms.cell.lengths().round(2)} A, model {calc.num_params:,} parameters "
          f"({calc.dtype}), cutoff {calc.config.rcut} A")

    _, shift = space.periodic_general(box)
    energy = djm.energy_fn(calc, species, box)
    # fcc Cu has no neighbour shell between 4.42 and 5.10 A: a 0.5 A skin adds few edges and rebuilds are rare.
    neighbor_fn = djm.neighbor_list(box, calc.config.rcut, dr_threshold=0.5)
    nbrs = neighbor_fn.allocate(positions)
    print(f"neighbour list: {int(jnp.sum(nbrs.idx[0] < len(atoms))):,} edges, capacity {nbrs.max_occupancy:,}")

    kT, dt = 300 * units.kB, 2 * units.fs
    init, apply = simulate.nvt_nose_hoover(energy, shift, dt, kT, tau=100 * dt)
    state = jax.jit(init)(jax.random.key(0), positions, mass=jnp.asarray(atoms.get_masses()), neighbor=nbrs)

    @jax.jit
    def observables(state, nbrs):
        temperature = quantity.temperature(momentum=state.momentum, mass=state.mass) / units.kB
        # Potential plus kinetic plus thermostat energy: constant if the dynamics is right.
        conserved = simulate.nvt_nose_hoover_invariant(energy, state, kT, neighbor=nbrs)
        return temperature, energy(state.position, nbrs) / len(atoms), conserved

    def report(step, state, nbrs):
        temperature, e_atom, conserved = observables(state, nbrs)
        print(f"  step {step:4d}  T {temperature:6.1f} K  E_pot {e_atom:+.5f} eV/atom  conserved {conserved:+.4f} eV")

    chunks = max(args.steps // args.chunk, 2)
    print(f"NVT at 300 K, dt 2 fs, {chunks} x {args.chunk} steps, each chunk one jitted lax.scan:")
    elapsed = 0.0
    for i in range(1, chunks + 1):
        t = time.perf_counter()
        state, nbrs = djm.run(apply, state, neighbor_fn, nbrs, args.chunk, chunk=args.chunk)
        jax.block_until_ready(state.position)
        if i == 1:
            print(f"  first chunk, compilation included: {time.perf_counter() - t:.1f} s")
        else:
            elapsed += time.perf_counter() - t
        report(i * args.chunk, state, nbrs)
    steps = (chunks - 1) * args.chunk
    print(f"after compilation: {steps} steps in {elapsed:.1f} s, {steps / elapsed:.2f} steps/s "
          f"({steps * len(atoms) / elapsed:,.0f} atom-steps/s)")

if __name__ == "__main__":
    main()
