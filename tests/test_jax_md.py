"""DPA4 in JAX-MD: the calculator's energy, forces and stress at any cell size, energy conservation, overflow.

A one-block variant of the tiny test model keeps the compilations (most of the run time) short; float64.
"""

import dataclasses
import logging
import types

import jax
import jax.numpy as jnp
import jax_md
import numpy as np
import pytest
from ase import units
from ase.build import bulk
from jax_md import quantity, simulate, space

from conftest import TINY, cu_au_cell, make_calc, methanol, triclinic_cell
from dpa4_jax import jax_md as djm
from dpa4_jax.calculator import DPA4Calculator
from dpa4_jax.graph import neighbor_list as graph_neighbor_list

RCUT = TINY["rcut"]


@pytest.fixture(scope="module")
def smooth_calc():
    """``conftest.make_calc`` with one block and lmax 1."""
    return make_calc(seed=2, n_blocks=1, mixing_layers=1, n_focus=1, lmax=1)


@pytest.fixture(scope="module")
def zbl_calc(smooth_calc):
    # ZBL is not switched off at rcut, so the edges between rcut and rcut + skin that the
    # JAX-MD list holds would change the energy unless energy_fn drops them. Same parameters.
    return DPA4Calculator(dataclasses.replace(smooth_calc.config, bridging="zbl"), smooth_calc.variables, "float64")


def cubic():
    return cu_au_cell() * (3, 3, 3)  # 11.1 A: wider than 2 rcut


def small():
    return cu_au_cell() * (2, 2, 2)  # 7.4 A: narrower than 2 rcut, where minimum image drops edges


# Largest first: the calculator then compiles once. (structure, box form, fractional coordinates, search)
CASES = {
    "cubic": (cubic, "side", False, "cell_list"),  # space.periodic(side), Cartesian; 2 x 2 x 2 cells
    "small-cell": (small, "matrix", False, "auto"),  # space.periodic_general(box, fractional_coordinates=False)
    "triclinic": (triclinic_cell, "matrix", True, "auto"),  # space.periodic_general(box), fractional
    "molecule": (methanol, None, False, "auto"),  # space.free()
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_calculator(zbl_calc, case):
    make, box_form, fractional, method = CASES[case]
    atoms = make()
    atoms.calc = zbl_calc
    e_ref, f_ref = atoms.get_potential_energy(), atoms.get_forces()

    positions, box, species = djm.from_atoms(atoms, zbl_calc.config.type_map, fractional)
    if box_form == "side":
        box = atoms.cell[0, 0]
    energy = djm.energy_fn(zbl_calc, species, box, fractional_coordinates=fractional)
    nbrs = djm.neighbor_list(box, RCUT, fractional_coordinates=fractional, method=method).allocate(positions)
    assert not nbrs.did_buffer_overflow and (nbrs.cells is not None) == (method == "cell_list")

    @jax.jit
    def efs(positions, nbrs):
        e, grad = jax.value_and_grad(energy)(positions, nbrs)
        stress = quantity.stress(energy, positions, box, neighbor=nbrs) if box is not None else None
        return e, -grad, stress

    e, f, stress = efs(positions, nbrs)
    assert abs(float(e) - e_ref) <= 1e-10 * abs(e_ref)
    np.testing.assert_allclose(f, f_ref, rtol=0, atol=1e-10 * np.abs(f_ref).max())
    if box is not None:
        s_ref = atoms.get_stress(voigt=False)
        # JAX-MD's stress is positive under compression: minus ASE's.
        np.testing.assert_allclose(-np.asarray(stress), s_ref, rtol=0, atol=1e-10 * np.abs(s_ref).max())


NO_NET_FORCE = jnp.zeros(3)
STEPS_FS = (0.5, 0.25)  # time steps of the NVE runs


@pytest.fixture(scope="module")
def nve(smooth_calc):
    """A 32-atom Cu3Au cell narrower than 2 rcut at 1000 K, fractional coordinates wrapped at every step.

    ``apply[dt]`` is velocity Verlet with time step ``dt`` fs. The force is the model's plus
    ``net`` on every atom, a keyword of ``apply``: zero except in the deliberately wrong runs,
    which thus share the compilations.
    """
    atoms = small()
    positions, box, species = djm.from_atoms(atoms, smooth_calc.config.type_map)
    energy = djm.energy_fn(smooth_calc, species, box)
    model_force = quantity.force(energy)
    neighbor_fn = djm.neighbor_list(box, RCUT)
    nbrs = neighbor_fn.allocate(positions)
    _, shift = space.periodic_general(box)

    def force(x, net=NO_NET_FORCE, **kwargs):
        return model_force(x, **kwargs) + net

    integrators = {dt: simulate.nve(force, shift, dt * units.fs) for dt in STEPS_FS}
    init = integrators[STEPS_FS[0]][0]
    state = jax.jit(init)(jax.random.key(0), positions, 1000 * units.kB, mass=jnp.asarray(atoms.get_masses()),
                          neighbor=nbrs)
    return types.SimpleNamespace(energy=energy, potential=jax.jit(energy), shift=shift, neighbor_fn=neighbor_fn,
                                 nbrs=nbrs, apply={dt: apply for dt, (_, apply) in integrators.items()},
                                 state=state, box=box)


def total_energy_error(nve, dt, net, duration=50.0, samples=10):
    """``max_t |E(t) - E(0)| / KE(0)`` over ``duration`` fs of steps of ``dt`` fs, sampled ``samples`` times."""
    state, nbrs = nve.state, nve.nbrs
    chunk = round(duration / dt / samples)
    totals = []
    for _ in range(samples + 1):
        kinetic = quantity.kinetic_energy(momentum=state.momentum, mass=state.mass)
        totals.append(float(nve.potential(state.position, nbrs) + kinetic))
        state, nbrs = djm.run(nve.apply[dt], state, nve.neighbor_fn, nbrs, chunk, chunk=chunk, net=net)
    kinetic = float(quantity.kinetic_energy(momentum=nve.state.momentum, mass=nve.state.mass))
    return np.max(np.abs(np.array(totals) - totals[0])) / kinetic


def test_nve_conserves_energy(nve):
    # 50 fs at 1000 K (~3 A of thermal motion): atoms leave the cell and are wrapped back, the list is
    # rebuilt. With conservative forces velocity Verlet's energy error is bounded and O(dt^2): halving
    # the step divides it by ~4 (measured over 50 fs: 2.2e-3 at 0.5 fs, 5.5e-4 at 0.25 fs; over 100 fs
    # 2.2e-3, 6.2e-4 and 1.6e-4 at 0.125 fs for this random, rather stiff model). A force that is the
    # gradient of no energy adds work that does not shrink with the step (measured: 5.5e-2 and 5.6e-2):
    # the second pair of runs adds a net 5% of the RMS force on every atom
    # (a uniform force is the gradient of no periodic energy; one breaking Newton's third law like
    # this is what a sender/receiver mix-up gives). JAX-MD's own multi-image list, whose image shifts
    # go stale when the integrator wraps an atom into the cell before the list update, is such a case.
    coarse, fine = (total_energy_error(nve, dt, NO_NET_FORCE) for dt in STEPS_FS)
    assert fine < coarse / 3 and coarse < 1e-2, (coarse, fine)

    rms = jnp.sqrt(jnp.mean(nve.state.force**2))
    wrong = 0.05 * rms * jnp.array([1.0, 0.0, 0.0])
    wrong_coarse, wrong_fine = (total_energy_error(nve, dt, wrong) for dt in STEPS_FS)
    assert wrong_fine > coarse / 3 and wrong_fine > wrong_coarse / 2, (coarse, fine, wrong_coarse, wrong_fine)


def test_overflow_is_reallocated(nve):
    # A list sized for a 25% wider cell has half the capacity this cell needs.
    too_small = nve.neighbor_fn.allocate(nve.state.position, box=1.25 * nve.box)
    too_small = nve.neighbor_fn.update(nve.state.position, too_small, box=nve.box)
    assert too_small.did_buffer_overflow
    assert too_small.max_occupancy < nve.nbrs.max_occupancy

    state, nbrs = djm.run(nve.apply[STEPS_FS[0]], nve.state, nve.neighbor_fn, too_small, 20, chunk=20, net=NO_NET_FORCE)
    assert not nbrs.did_buffer_overflow and nbrs.max_occupancy >= nve.nbrs.max_occupancy
    ref_state, _ = djm.run(nve.apply[STEPS_FS[0]], nve.state, nve.neighbor_fn, nve.nbrs, 20, chunk=20, net=NO_NET_FORCE)
    np.testing.assert_allclose(state.position, ref_state.position, rtol=0, atol=1e-12)
    fresh = nve.neighbor_fn.allocate(state.position)
    np.testing.assert_allclose(nve.potential(state.position, nbrs), nve.potential(state.position, fresh),
                               rtol=1e-12)


@jax_md.dataclasses.dataclass
class Contracting:
    """A stand-in for an integrator state: a cluster shrinking 3% a step, so that its list overflows."""

    position: jnp.ndarray
    missing: jnp.ndarray  # most edges within the cutoff that a step's list lacked


def contract(state, neighbor):
    n = state.position.shape[0]
    distance = jnp.linalg.norm(state.position[:, None] - state.position[None], axis=-1)
    within = jnp.sum(distance < RCUT) - n
    listed = jnp.sum(neighbor.idx[0] < n)
    return Contracting(0.97 * state.position, jnp.maximum(state.missing, within - listed))


def test_run_redoes_overflowing_chunks():
    positions = jnp.asarray(small().positions)  # as a free cluster
    neighbor_fn = djm.neighbor_list(None, RCUT, dr_threshold=0.0)
    nbrs = neighbor_fn.allocate(positions)
    # Edges grow ~8% a step: the first 4-step chunk outgrows the list (25% margin) part-way through.
    state, grown = djm.run(contract, Contracting(positions, jnp.array(0)), neighbor_fn, nbrs, 8, chunk=4)
    assert grown.max_occupancy > nbrs.max_occupancy  # re-allocated
    assert int(state.missing) == 0  # every step that was kept saw a complete list
    np.testing.assert_allclose(state.position, 0.97**8 * positions)


# ---------------------------------------------------------------- the two searches

def listed_pairs(nbrs, n_atoms) -> set:
    """``{(receiver, sender, shift)}`` of a list."""
    receivers, senders = np.asarray(nbrs.idx)
    shifts = np.asarray(nbrs.shifts).astype(int)
    real = receivers < n_atoms
    return set(zip(receivers[real].tolist(), senders[real].tolist(), map(tuple, shifts[real].tolist())))


def vesin_pairs(positions, cell, radius) -> set:
    senders, receivers, shifts = graph_neighbor_list(positions, cell, [True] * 3, radius)
    return set(zip(receivers.tolist(), senders.tolist(), map(tuple, shifts.astype(int).tolist())))


def random_box(rng, widths) -> np.ndarray:
    """Lattice vectors as rows, skewed at random, each height (width across faces) as given."""
    cell = np.eye(3) + np.triu(rng.uniform(-0.5, 0.5, (3, 3)), 1)
    return cell * (widths / (1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)))[:, None]


SKIN = 0.25
RADIUS = RCUT + SKIN
BOXES = {  # heights in units of the list's radius (cutoff + skin): cells per axis = floor(height); coordinates
    "just-wide-enough": ((3.001, 3.001, 3.001), True),  # 3 cells per axis, the fewest the 27-cell stencil needs
    "just-too-narrow": ((2.999, 3.5, 4.2), False),  # 2 cells along a: the stencil wraps onto one cell twice
    "wide-skewed": ((4.5, 5.2, 3.3), False),
    "narrower-than-radius": ((0.8, 1.6, 2.4), True),  # several images of one atom
}


@pytest.mark.parametrize("box_name", list(BOXES))
@pytest.mark.parametrize("method", ["cell_list", "multi_image"])
def test_searches_match_vesin(box_name, method):
    widths, fractional_coordinates = BOXES[box_name]
    rng = np.random.default_rng(sorted(BOXES).index(box_name))
    cell = random_box(rng, RADIUS * np.array(widths))
    n_atoms = max(round(0.05 * abs(np.linalg.det(cell))), 8)  # a liquid's density (0.05 atoms/A^3)
    # Positions in and around the cell (unwrapped), so that the shifts must account for the wrap.
    fractional = rng.uniform(-0.6, 1.6, (n_atoms, 3))
    neighbor_fn = djm.neighbor_list(jnp.asarray(cell.T), RCUT, dr_threshold=SKIN, method=method,
                                    fractional_coordinates=fractional_coordinates, min_pair_dist=0.0)
    to_cartesian = (lambda x, cell: x @ cell) if fractional_coordinates else (lambda x, cell: x)
    given = fractional if fractional_coordinates else fractional @ cell
    nbrs = neighbor_fn.allocate(jnp.asarray(given))
    assert (nbrs.cells is None) == (method == "multi_image")
    assert listed_pairs(nbrs, n_atoms) == vesin_pairs(to_cartesian(given, cell), cell, RADIUS)

    # Rebuilt inside jit after a move, in a box strained by up to 2% (larger: the cells still reach).
    box = cell @ (np.eye(3) + rng.uniform(0, 0.02, (3, 3)))
    moved = given + rng.normal(0, 0.3 / np.linalg.norm(cell, axis=1).mean() if fractional_coordinates else 0.3,
                               given.shape)
    rebuilt = jax.jit(neighbor_fn.update)(jnp.asarray(moved), nbrs, box=jnp.asarray(box.T))
    assert not rebuilt.did_buffer_overflow
    assert listed_pairs(rebuilt, n_atoms) == vesin_pairs(to_cartesian(moved, box), box, RADIUS)


def test_automatic_choice():
    # A 32-atom cell: the minimum image alone (32 candidates per atom) beats 27 cells of the whole box.
    # 864 atoms in 5 x 5 x 5 cells: 27 cells of ~7 atoms (~250 candidates per atom) beat 864.
    for atoms, expected in ((small(), None), (cu_au_cell() * (6, 6, 6), (5, 5, 5))):
        positions, box, _ = djm.from_atoms(atoms, TINY["type_map"])
        nbrs = djm.neighbor_list(box, RCUT, dr_threshold=SKIN).allocate(positions)
        assert nbrs.cells == expected
        forced = djm.neighbor_list(box, RCUT, dr_threshold=SKIN, method="cell_list").allocate(positions)
        assert listed_pairs(forced, len(atoms)) == listed_pairs(nbrs, len(atoms))


def test_cell_list_flags_a_shrunk_box():
    # 3 cells just wider than the radius: 1% smaller, a pair within the radius can skip a cell.
    cell = random_box(np.random.default_rng(5), RADIUS * np.full(3, 3.001))
    positions = np.random.default_rng(6).uniform(0, 1, (100, 3))
    neighbor_fn = djm.neighbor_list(jnp.asarray(cell.T), RCUT, dr_threshold=SKIN, method="cell_list",
                                    min_pair_dist=0.0)
    nbrs = neighbor_fn.allocate(jnp.asarray(positions))
    assert not neighbor_fn.update(jnp.asarray(positions), nbrs, box=jnp.asarray(1.01 * cell.T)).did_buffer_overflow
    assert neighbor_fn.update(jnp.asarray(positions), nbrs, box=jnp.asarray(0.99 * cell.T)).did_buffer_overflow


def test_close_pair_warns_once(caplog):
    atoms = small()
    atoms.positions[5] = atoms.positions[3] + [0.03, 0.04, 0.0]  # 0.05 A apart
    positions, box, _ = djm.from_atoms(atoms, TINY["type_map"])
    neighbor_fn = djm.neighbor_list(box, RCUT)
    with caplog.at_level(logging.WARNING, logger="dpa4_jax.jax_md"):
        neighbor_fn.allocate(positions)
        assert len(caplog.records) == 1
        assert "atoms 3 and 5 are 0.05 Å apart (1 pair(s) closer than min_pair_dist 0.1 Å)" in caplog.text
        neighbor_fn.allocate(positions)  # once per list function
        djm.neighbor_list(box, RCUT).allocate(djm.from_atoms(small(), TINY["type_map"])[0])  # nothing close
        assert len(caplog.records) == 1


def update_scratch_bytes(n_cells_per_side: int) -> tuple[int, int]:
    """Atoms and XLA's scratch memory of a cell-list rebuild, fcc Cu at ``n_cells_per_side``^3 unit cells."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * ((n_cells_per_side,) * 3)
    positions, box, _ = djm.from_atoms(atoms, TINY["type_map"])
    neighbor_fn = djm.neighbor_list(box, 3.0, dr_threshold=0.3)
    nbrs = neighbor_fn.allocate(positions)
    assert nbrs.cells is not None
    compiled = jax.jit(neighbor_fn.update).lower(positions, nbrs).compile()
    return len(atoms), compiled.memory_analysis().temp_size_in_bytes


def test_cell_list_memory_is_linear():
    # 2,048 and 16,384 atoms (8x): a rebuild's scratch memory grows ~8x, as the (N, 27, cell capacity)
    # candidates do; an N^2 search would grow 64x and need N^2 x 8 bytes (2.1 GB) for one float64 array.
    (_, small_bytes), (n_large, large_bytes) = update_scratch_bytes(8), update_scratch_bytes(16)
    assert large_bytes < 10 * small_bytes, (small_bytes, large_bytes)
    assert large_bytes < n_large**2 * 8 / 10, large_bytes


def test_short_run_with_cell_list(smooth_calc):
    # 256 atoms in 3 x 3 x 3 cells at 1000 K with a thin skin: the list is rebuilt inside the jitted
    # scan; the rebuilt list must be the complete one (vesin) at the final positions.
    atoms = cu_au_cell() * (4, 4, 4)
    skin = 0.05
    positions, box, species = djm.from_atoms(atoms, smooth_calc.config.type_map)
    neighbor_fn = djm.neighbor_list(box, RCUT, dr_threshold=skin, method="cell_list")
    nbrs = neighbor_fn.allocate(positions)
    assert nbrs.cells == (3, 3, 3)
    _, shift = space.periodic_general(box)
    init, apply = simulate.nve(djm.energy_fn(smooth_calc, species, box), shift, 1.0 * units.fs)
    state = init(jax.random.key(1), positions, 1000 * units.kB, mass=jnp.asarray(atoms.get_masses()), neighbor=nbrs)
    state, nbrs = djm.run(apply, state, neighbor_fn, nbrs, 6, chunk=6)
    assert not nbrs.did_buffer_overflow
    assert not np.array_equal(nbrs.reference_position, positions)  # rebuilt
    final = np.asarray(space.transform(box, nbrs.reference_position))
    assert listed_pairs(nbrs, len(atoms)) == vesin_pairs(final, atoms.cell.array, RCUT + skin)
