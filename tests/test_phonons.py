"""Exact Hessians, force constants and κ through phonopy/phono3py, the phonon CLI and the Matbench κ protocol.

Crystals with symmetry use the chiral space group P3_121 (trigonal Si3, the Se structure): DPA4 is invariant
under rotations but not under reflections (a random model's energy changes by ~1e-4 of itself under a mirror),
so phonopy's symmetrisation is exact for it only in a group of proper rotations.
"""

import ase.io
import numpy as np
import pandas as pd
import phono3py  # the optional extra `phonons` (and `test`): a missing one fails here
import phonopy
import pytest
import yaml
from ase import Atoms
from ase.build import bulk
from conftest import make_calc, methanol, triclinic_cell

from dpa4_jax import phonons
from dpa4_jax.matbench import kappa as matbench_kappa
from dpa4_jax import checkpoint

MESH = (3, 3, 3)


def trigonal_si(x=0.22):
    """Si3 in the Se structure (P3_121, proper rotations only)."""
    return Atoms("Si3", scaled_positions=[[x, 0, 1 / 3], [0, x, 2 / 3], [-x, -x, 0]],
                 cell=[[4.7, 0, 0], [-2.35, 4.7 * 3**0.5 / 2, 0], [0, 0, 5.0]], pbc=True)


def rattled(atoms, seed=1):
    atoms = atoms.copy()
    atoms.rattle(0.05, seed=seed)
    return atoms


def ase_forces(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_forces()


@pytest.fixture(scope="module")
def calc():
    return make_calc()


@pytest.fixture(scope="module")
def hessians(calc):
    """Hessians of a crystal, a triclinic cell smaller than the cutoff and a molecule: the padded budget is
    grown to hold all three first, so that they share one compilation."""
    structures = {"crystal": rattled(trigonal_si()), "small triclinic": triclinic_cell(), "molecule": methanol()}
    for atoms in structures.values():
        calc.graph(atoms)
    return {name: (atoms, calc.get_hessian(atoms)) for name, atoms in structures.items()}


@pytest.mark.parametrize("name", ["crystal", "small triclinic", "molecule"])
def test_hessian_is_the_derivative_of_the_forces(calc, hessians, name):
    atoms, h = hessians[name]
    n, step = len(atoms), 1e-5
    fd = np.zeros_like(h)
    for k in range(3 * n):
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[k // 3, k % 3] += sign * step
            fd[k] -= sign * ase_forces(calc, moved).reshape(-1) / (2 * step)
    scale = np.abs(h).max()
    assert np.abs(h - fd).max() < 1e-6 * scale
    assert np.abs(h - h.T).max() < 1e-10 * scale
    # acoustic sum rule (translation invariance), before any symmetrisation
    assert np.abs(h.reshape(n, 3, n, 3).sum(axis=2)).max() < 1e-10 * scale


def test_fc2_from_hessian_equals_phonopy_finite_differences(calc, hessians):
    ph = phonopy.Phonopy(phonons.to_phonopy(trigonal_si()), supercell_matrix=np.eye(3, dtype=int),
                         primitive_matrix="auto")
    ph.generate_displacements(distance=1e-5, is_plusminus=True)
    ph.forces = np.array([ase_forces(calc, phonons.to_ase(s)) for s in ph.supercells_with_displacements])
    ph.produce_force_constants()
    exact = phonons.fc2_from_hessian(calc, ph.supercell)
    assert exact.shape == ph.force_constants.shape
    assert np.abs(exact - ph.force_constants).max() < 1e-6 * np.abs(exact).max()
    compact = phonons.fc2_from_hessian(calc, ph.supercell, ph.primitive.p2s_map)
    np.testing.assert_array_equal(compact, exact[ph.primitive.p2s_map])


@pytest.fixture(scope="module")
def stable_calc():
    """A model for which fcc Cu (``fcc_cu``) has no imaginary modes, so that the CLI goes on to FC3 and κ."""
    return make_calc(seed=1)


def fcc_cu():
    return bulk("Cu", "fcc", a=3.5525)  # near the lattice constant of stable_calc (relaxed: 3.5525 Å)


def test_batched_kappa_equals_phono3py_through_ase(calc):
    batched = phonons.init_phono3py(trigonal_si(), [1, 1, 1], mesh=MESH)  # a small cell: the same forces either way
    evaluated = phonons.produce_fc2(calc, batched) + phonons.produce_fc3(calc, batched)
    assert evaluated == len(batched.supercells_with_displacements) == 57

    one_at_a_time = phonons.init_phono3py(trigonal_si(), [1, 1, 1], mesh=MESH)
    one_at_a_time.forces = np.array([ase_forces(calc, phonons.to_ase(s))
                                     for s in one_at_a_time.supercells_with_displacements])
    one_at_a_time.produce_fc2(symmetrize_fc2=True)
    one_at_a_time.produce_fc3(symmetrize_fc3r=True)
    for key in ("forces", "fc2", "fc3"):
        expected = getattr(one_at_a_time, key)
        assert np.abs(getattr(batched, key) - expected).max() < 1e-10 * np.abs(expected).max(), key
    # κ with a Gaussian smearing, a smooth function of the force constants. With the protocol's tetrahedron method
    # it is not one on a 3x3x3 mesh of a symmetric crystal: its weights jump where two frequencies coincide
    # exactly, so force constants equal to 3e-14 gave κ 3e-3 apart here (fcc Cu at 3x3x3 supercells, no imaginary
    # mode: 12%); with σ = 0.1 THz, 5e-15 (measured).
    kappa = phonons.conductivity(batched, [300, 600], sigma=0.1)
    reference = phonons.conductivity(one_at_a_time, [300, 600], sigma=0.1)
    for key in ("kappa", "kappa_intra", "kappa_inter"):  # Wigner total, RTA (particle-like), coherences
        expected = getattr(reference, key)
        assert np.abs(getattr(kappa, key) - expected).max() < 1e-6 * np.abs(expected).max(), key
    assert np.abs(kappa.kappa_inter).max() > 0


# ---------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_dir(stable_calc, tmp_path_factory):
    calc = stable_calc
    text = yaml.safe_dump({"model": calc.config.to_dict(), "training": {"dtype": "float64"}})
    return checkpoint.save_model(tmp_path_factory.mktemp("run"), calc.variables, text)


def cli(model_dir, structure, output, *extra):
    return phonons.main(["--model", str(model_dir), "--structure", str(structure), "--mesh", *map(str, MESH),
                         "--output", str(output), "--batch-size", "16", *extra])


def test_cli_writes_force_constants_and_kappa(model_dir, tmp_path, capsys):
    ase.io.write(tmp_path / "POSCAR", fcc_cu(), format="vasp")
    output = tmp_path / "out"
    # a 2x2x2 supercell of the 1-atom cell folds each neighbour onto its image (FC3 = 0): accepted here only to
    # check that the files are written whole, with a small model call
    assert cli(model_dir, tmp_path / "POSCAR", output, "--supercell", "2", "2", "2", "--min-length", "0") == 0
    printed = capsys.readouterr().out
    assert "15 supercells evaluated" in printed and "Wigner" in printed
    assert {p.name for p in output.iterdir()} == {"fc2.hdf5", "fc3.hdf5", "phono3py_params.yaml",
                                                  "kappa-m333.hdf5"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    fc3 = phono3py.file_IO.read_fc3_from_hdf5(str(output / "fc3.hdf5"))
    assert fc3.shape == (1, 8, 8, 3, 3, 3)
    smeared = tmp_path / "smeared"  # Gaussian smearing in place of the tetrahedron method: phono3py names the file
    assert cli(model_dir, tmp_path / "POSCAR", smeared, "--supercell", "2", "2", "2", "--min-length", "0",
               "--sigma", "0.1") == 0
    assert "kappa-m333-s0.1.hdf5" in {p.name for p in smeared.iterdir()}


def _bad_input_cases(tmp_path):
    (tmp_path / "garbage.vasp").write_text("this is not\na POSCAR\n")
    iron = bulk("Fe", "bcc", a=2.87, cubic=True)
    ase.io.write(tmp_path / "Fe.vasp", iron, format="vasp")
    ase.io.write(tmp_path / "Si.vasp", bulk("Si", "diamond", a=5.43), format="vasp")
    ase.io.write(tmp_path / "bcc.vasp", bulk("Cu", "bcc", a=2.87), format="vasp")  # unstable for this model
    return {
        "unparseable": (["garbage.vasp", "--supercell", "1", "1", "1"], ["garbage.vasp", "could not be read"]),
        "element": (["Fe.vasp", "--supercell", "2", "2", "2"], ["Fe", "type map"]),
        "small supercell": (["Si.vasp", "--supercell", "2", "2", "2"], ["shortest lattice vector is 7.679 Å",
                                                                         "less than 8 Å"]),
        "imaginary": (["bcc.vasp", "--supercell", "2", "2", "2", "--relax", "--min-length", "0"],
                      ["imaginary mode", "q = (", "THz"]),
    }


def test_cli_names_bad_input_and_writes_nothing(model_dir, tmp_path, capsys):
    for case, (args, expected) in _bad_input_cases(tmp_path).items():
        output = tmp_path / f"out-{case}"
        assert cli(model_dir, tmp_path / args[0], output, *args[1:]) == 1, case
        message = capsys.readouterr().err
        assert all(text in message for text in expected), (case, message)
        assert not output.exists(), case
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# ---------------------------------------------------------------------------------------- the Matbench protocol
def test_matbench_kappa_protocol(tmp_path):
    """Two structures in the PhononDB file's format: fcc Cu (stable for this model) gets κ, bcc Cu (imaginary
    modes) is flagged; scored against a reference of twice the fcc prediction's κ."""
    calc = make_calc(seed=1)
    text = yaml.safe_dump({"model": calc.config.to_dict(), "training": {"dtype": "float64"}})
    model = checkpoint.save_model(tmp_path / "run", calc.variables, text)
    bcc, fcc = bulk("Cu", "bcc", a=2.87), bulk("Cu", "fcc", a=3.6)
    for atoms, material in ((bcc, "mp-x"), (fcc, "mp-30")):
        atoms.info.update(material_id=material, fc2_supercell=np.diag([2, 2, 2]), fc3_supercell=np.diag([2, 2, 2]),
                          q_point_mesh=[3, 3, 3])
    ase.io.write(tmp_path / "structures.extxyz", [bcc, fcc])
    args = ["--model", str(model), "--structures", str(tmp_path / "structures.extxyz"), "--max-steps", "100",
            "--batch-size", "16"]
    assert matbench_kappa.main("kappa", [*args, "--output", str(tmp_path / "pred")]) == 0
    pred = pd.read_json(tmp_path / "pred" / "kappa.json.gz").set_index("material_id")
    row = pred.loc["mp-30"]
    assert not row["has_imag_ph_modes"] and not row["broken_symmetry"] and row["final_spg_num"] == 225
    modes = np.asarray(row["mode_kappa_tot_rta"])  # (T, q, band, 6): the modes add up to κ_P + κ_C
    total = modes.sum(axis=(1, 2)) / np.sum(row["mode_weights"])
    scale = np.abs(row["kappa_tot_rta"]).max()
    np.testing.assert_allclose(total, row["kappa_tot_rta"], rtol=1e-10, atol=1e-10 * scale)
    np.testing.assert_allclose(row["kappa_tot_rta"], np.add(row["kappa_p_rta"], row["kappa_c"]), atol=1e-10 * scale)
    flagged = pred.loc["mp-x"]  # imaginary modes named with their q-points and frequencies
    assert flagged["has_imag_ph_modes"] and all(s in flagged["errors"][0] for s in ("imaginary mode", "q = (", "THz"))

    reference = pd.DataFrame([  # twice the fcc prediction; any κ for the flagged structure
        {"material_id": "mp-30", "kappa_tot_rta": (2 * np.asarray(row["kappa_tot_rta"])).tolist(),
         "mode_kappa_tot_rta": (2 * modes).tolist()},
        {"material_id": "mp-x", "kappa_tot_rta": [[1.0] * 6], "mode_kappa_tot_rta": [[[[0.5] * 6]]]}])
    reference.to_json(tmp_path / "reference.json.gz", double_precision=15)
    rows, mean = matbench_kappa.score(pred.reset_index().to_dict("records"),
                                      matbench_kappa.read_reference(tmp_path / "reference.json.gz"))
    scored = pd.DataFrame(rows).set_index("material_id")
    average = modes[0, ..., :3].mean(axis=-1)  # SRME = 2 sum|m - 2m| / W / (κ + 2κ) with κ = sum m / W
    assert scored.loc["mp-30", "srd"] == pytest.approx(-2 / 3, rel=1e-10)
    assert scored.loc["mp-30", "srme"] == pytest.approx(2 / 3 * np.abs(average).sum() / average.sum(), rel=1e-10)
    assert scored.loc["mp-x", "srme"] == 2 and scored.loc["mp-x", "srd"] == -2
    assert mean == pytest.approx(scored["srme"].mean())
