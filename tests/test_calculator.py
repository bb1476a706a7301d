"""The ASE calculator: equal to the model's direct output, bounded compilations, relaxations, edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms, units
from ase.build import bulk, fcc111
from ase.filters import FrechetCellFilter
from ase.md.langevin import Langevin
from ase.optimize import FIRE

from conftest import cu_au_cell, make_calc
from dpa4_jax import graph as graphs
from dpa4_jax import physics
from dpa4_jax.elements import species_indices


def test_calculator_equals_model(tiny_calc):
    atoms = cu_au_cell(seed=4)
    atoms.calc = tiny_calc
    species = species_indices(atoms.numbers, tiny_calc.config.type_map)
    g = graphs.structure_graph(species, atoms.positions, atoms.cell.array, atoms.pbc, tiny_calc.config.rcut)
    direct = jax.jit(physics.energy_forces_virial, static_argnums=0)
    out = direct(tiny_calc.model, tiny_calc.variables, jax.tree.map(jnp.asarray, graphs.pad(g, graphs.Budget(9, 3000, 2))))
    np.testing.assert_allclose(atoms.get_potential_energy(), out["energy"][0], rtol=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), out["forces"][:4], atol=1e-12)
    np.testing.assert_allclose(atoms.get_potential_energies(), out["energies"][:4], atol=1e-12)
    np.testing.assert_allclose(atoms.get_potential_energies().sum(), atoms.get_potential_energy(), rtol=1e-12)
    s = out["stress"][0]
    np.testing.assert_allclose(atoms.get_stress(), [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]], atol=1e-12)
    np.testing.assert_allclose(atoms.get_stress(voigt=False), -out["virial"][0] / atoms.get_volume(), atol=1e-10)


def test_md_compiles_a_bounded_number_of_times():
    """200 Langevin steps of a hot crystal (neighbour counts fluctuate) compile at most 3 times."""
    calc = make_calc(seed=5, dtype="float32")
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 1))
    atoms.calc = calc
    counts = []
    dyn = Langevin(atoms, timestep=2 * units.fs, temperature_K=2000, friction=0.05, rng=np.random.default_rng(0))
    dyn.attach(lambda: counts.append(int(calc.graph(atoms).n_edge[0])), interval=10)
    dyn.run(200)
    assert len(set(counts)) > 3  # the neighbour count did fluctuate
    assert 1 <= calc.compilations <= 3


def test_relaxation_lowers_energy_and_stress(tiny_calc):
    atoms = bulk("Cu", "fcc", a=3.8, cubic=True)
    atoms.set_cell(atoms.cell.array @ np.array([[1.03, 0.02, 0], [0.02, 0.98, 0], [0, 0, 1.01]]), scale_atoms=True)
    atoms.rattle(0.05, seed=1)
    atoms.calc = tiny_calc
    e0, s0 = atoms.get_potential_energy(), np.abs(atoms.get_stress()).max()
    FIRE(FrechetCellFilter(atoms), logfile=None).run(fmax=0.02, steps=300)
    assert atoms.get_potential_energy() < e0
    assert np.abs(atoms.get_stress()).max() < 0.5 * s0


def test_molecules_slabs_and_lone_atoms(tiny_calc):
    # a slab (periodic in x, y): invariant under in-plane translations and rotations about z
    slab = fcc111("Cu", size=(1, 1, 3), vacuum=5.0, a=3.7)
    slab.rattle(0.05, seed=2)
    slab.calc = tiny_calc
    e = slab.get_potential_energy()
    moved = slab.copy()
    moved.positions += [0.7, -0.4, 1.3]
    moved.calc = tiny_calc
    assert abs(moved.get_potential_energy() - e) < 1e-10 * abs(e)
    assert abs(slab.get_forces().sum(axis=0)).max() < 1e-10
    # an atom with no neighbours: finite energy, zero force, the same wherever it is
    lone = Atoms("CO", positions=[[0, 0, 0], [0, 0, 20.0]])
    lone.calc = tiny_calc
    f = lone.get_forces()
    assert np.isfinite(lone.get_potential_energy()) and np.all(f == 0)
    far = Atoms("CO", positions=[[0, 0, 0], [30.0, 0, 0]])
    far.calc = tiny_calc
    assert abs(far.get_potential_energy() - lone.get_potential_energy()) < 1e-12
