"""Physics of the model: symmetries, conservative forces and stress, smoothness, padding."""

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from ase import Atoms
from scipy.spatial.transform import Rotation

from conftest import cu_au_cell, methanol, triclinic_cell
from dpa4_jax import graph as graphs
from dpa4_jax import physics
from dpa4_jax.elements import species_indices
from dpa4_jax.zbl import zbl_pair_energy


def efs(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    stress = atoms.get_stress(voigt=False) if atoms.pbc.all() else None
    return atoms.get_potential_energy(), atoms.get_forces(), stress


@pytest.mark.parametrize("make", [cu_au_cell, triclinic_cell, methanol])
def test_rotation_translation_permutation(tiny_calc, make):
    atoms = make()
    e0, f0, s0 = efs(tiny_calc, atoms)
    rot = Rotation.random(random_state=7).as_matrix()
    moved = atoms.copy()
    moved.positions = atoms.positions @ rot.T + np.array([0.3, -1.2, 2.5])
    if atoms.pbc.all():
        moved.cell = atoms.cell.array @ rot.T
    perm = np.random.default_rng(1).permutation(len(atoms))
    moved = moved[perm]
    e1, f1, s1 = efs(tiny_calc, moved)
    scale = np.abs(f0).max()
    assert abs(e1 - e0) <= 1e-10 * abs(e0)
    np.testing.assert_allclose(f1, f0[perm] @ rot.T, atol=1e-10 * scale)
    if s0 is not None:
        np.testing.assert_allclose(s1, rot @ s0 @ rot.T, atol=1e-10 * np.abs(s0).max())


def test_supercell_energy_is_sum_of_images(tiny_calc):
    atoms = cu_au_cell()
    e, f, s = efs(tiny_calc, atoms)
    e2, f2, s2 = efs(tiny_calc, atoms.repeat((2, 1, 1)))
    assert abs(e2 - 2 * e) <= 1e-10 * abs(e)
    np.testing.assert_allclose(f2, np.concatenate([f, f]), atol=1e-10 * np.abs(f).max())
    np.testing.assert_allclose(s2, s, atol=1e-10 * np.abs(s).max())


def _central_difference(fun, x, h=1e-4):
    """4th-order central differences of a scalar function of an array."""
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        values = []
        for step in (-2, -1, 1, 2):
            y = x.copy()
            y[idx] += step * h
            values.append(fun(y))
        grad[idx] = (values[0] - 8 * values[1] + 8 * values[2] - values[3]) / (12 * h)
    return grad


@pytest.mark.parametrize("make", [triclinic_cell, methanol])
def test_forces_and_stress_are_energy_derivatives(tiny_calc, make):
    atoms = make()
    e, f, s = efs(tiny_calc, atoms)

    def energy_at(positions):
        a = atoms.copy()
        a.positions = positions
        return efs(tiny_calc, a)[0]

    fd = -_central_difference(energy_at, atoms.positions.copy())
    np.testing.assert_allclose(f, fd, atol=1e-7 * np.abs(f).max())
    if atoms.pbc.all():
        def energy_strained(eps):
            a = atoms.copy()
            a.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
            return efs(tiny_calc, a)[0]

        fd_stress = _central_difference(energy_strained, np.zeros((3, 3))) / atoms.get_volume()
        fd_stress = 0.5 * (fd_stress + fd_stress.T)
        np.testing.assert_allclose(s, fd_stress, atol=1e-7 * np.abs(s).max())


@pytest.mark.parametrize("calc_name", ["tiny_calc", "mlp_bias_calc"])  # with biases: paper S-1.6, Eq. 69
def test_smooth_at_cutoff(calc_name, request):
    """Energy and forces tend continuously to their no-neighbour limit as a neighbour leaves the cutoff."""
    calc = request.getfixturevalue(calc_name)
    rcut = calc.config.rcut
    base = Atoms("COH", positions=[[0, 0, 0], [1.2, 0, 0], [0, 0, 0]])

    def with_third_at(r):
        a = base.copy()
        a.positions[2] = [0.1, r, 0.0]  # distance to C ~ r, to O > r: leaves C's sphere first
        return efs(calc, a)

    e_out, f_out, _ = efs(calc, base[:2] + Atoms("H", positions=[[0.1, 50.0, 0.0]]))
    for delta in (1e-2, 1e-3):
        r = np.sqrt((rcut - delta) ** 2 - 0.1**2)
        e_in, f_in, _ = with_third_at(r)
        # C3 envelopes: the energy approaches its limit at least like delta^3 (slack for the rest).
        assert abs(e_in - e_out) < 1e3 * delta**3
        assert np.abs(f_in - f_out).max() < 1e3 * delta**2
    r = np.sqrt((rcut + 1e-6) ** 2 - 0.1**2)  # just outside: exactly the limit
    e_just_out, _, _ = with_third_at(r)
    assert abs(e_just_out - e_out) < 1e-9


def test_zbl_dimer_force_inside_inner_radius(zbl_calc):
    """Inside r_in the learned branch is frozen: the force is the analytical ZBL force."""
    cfg = zbl_calc.config
    for r in (0.2, 0.35, 0.45):
        dimer = Atoms("CSi", positions=[[0, 0, 0], [r, 0, 0]])
        _, f, _ = efs(zbl_calc, dimer)
        with jax.enable_x64(True):
            dv = jax.grad(lambda d: zbl_pair_energy(d, jnp.float64(6.0), jnp.float64(14.0)))(jnp.float64(r))
        np.testing.assert_allclose(f[1, 0], -float(dv), rtol=1e-10)
        np.testing.assert_allclose(f[0, 0], float(dv), rtol=1e-10)
    assert cfg.bridging_r_inner == 0.5


def test_coincident_atoms_are_finite_with_zbl(zbl_calc):
    atoms = Atoms("CO", positions=[[0, 0, 0], [0, 0, 0]])
    e, f, _ = efs(zbl_calc, atoms)
    assert np.isfinite(e) and np.all(np.isfinite(f))


def _padded(calc, atoms_list, budget):
    g = graphs.batch([graphs.structure_graph(species_indices(a.numbers, calc.config.type_map), a.positions,
                                             a.cell.array, a.pbc, calc.config.rcut) for a in atoms_list])
    return jax.tree.map(jnp.asarray, graphs.pad(g, budget))


def test_padding_changes_nothing(tiny_calc):
    structures = [cu_au_cell(), methanol(), triclinic_cell()]
    compute = tiny_calc._compute
    n_node = sum(len(a) for a in structures)
    tight = _padded(tiny_calc, structures, graphs.Budget(n_node + 1, 4000, 4))
    loose = _padded(tiny_calc, structures, graphs.Budget(n_node + 17, 5000, 7))
    a, b = compute(tiny_calc.variables, tight), compute(tiny_calc.variables, loose)
    np.testing.assert_allclose(a["energy"][:3], b["energy"][:3], rtol=1e-12)
    np.testing.assert_allclose(a["forces"][:n_node], b["forces"][:n_node], atol=1e-12)
    np.testing.assert_allclose(a["stress"][:3], b["stress"][:3], atol=1e-12)
    assert np.all(b["forces"][n_node:] == 0) and np.all(b["energy"][3:] == 0)
    # ... and the batch equals the structures one by one.
    for i, atoms in enumerate(structures):
        e, f, _ = efs(tiny_calc, atoms)
        assert abs(float(a["energy"][i]) - e) <= 1e-10 * abs(e)
    assert jnp.all(jraph.get_node_padding_mask(loose)[:n_node])


def test_edge_frame_rolls_change_nothing(tiny_calc):
    """random_gamma: training rolls each edge frame by a random angle about its bond. Every operation in the
    local frame commutes with such rolls, so energies, forces and stresses equal those without (gamma = 0,
    inference) to round-off: the rolls are an augmentation of rounding only, and need no test-time average."""
    g = _padded(tiny_calc, [triclinic_cell(), methanol()], graphs.Budget(12, 900, 3))
    gamma = jax.random.uniform(jax.random.key(4), g.senders.shape, jnp.float64, 0.0, 2.0 * np.pi)
    compute = jax.jit(lambda v, gamma: physics.energy_forces_virial(tiny_calc.model, v, g, edge_gamma=gamma))
    a, b = compute(tiny_calc.variables, jnp.zeros_like(gamma)), compute(tiny_calc.variables, gamma)
    np.testing.assert_allclose(b["energy"], a["energy"], rtol=1e-12)
    np.testing.assert_allclose(b["forces"], a["forces"], atol=1e-11 * np.abs(a["forces"]).max())
    np.testing.assert_allclose(b["stress"], a["stress"], atol=1e-11 * np.abs(a["stress"]).max())
    assert np.abs(a["forces"]).max() > 1e-3


def test_bad_input_is_named(tiny_calc):
    with pytest.raises(ValueError, match="Fe"):
        efs(tiny_calc, Atoms("CFe", positions=[[0, 0, 0], [1, 0, 0]]))
    nan = methanol()
    nan.positions[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*\[2\]"):
        efs(tiny_calc, nan)
    flat = Atoms("CC", positions=[[0, 0, 0], [1, 0, 0]], cell=[[3, 0, 0], [0, 3, 0], [3, 3, 0]], pbc=True)
    with pytest.raises(ValueError, match="singular cell"):
        efs(tiny_calc, flat)
    with pytest.raises(ValueError, match="no atoms"):
        efs(tiny_calc, Atoms())
