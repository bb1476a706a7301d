"""dpa4_jax.lammps: LAMMPS's integrators and barostat with the model through fix external, against ASE's
velocity Verlet and DPA4Calculator on the same structures (float64)."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import yaml
from ase import Atoms, units
from ase.data import atomic_masses, atomic_numbers
from ase.md.verlet import VelocityVerlet
from conftest import ROOT, cu_au_cell, make_calc, methanol, triclinic_cell

from dpa4_jax import lammps as dpa4_lammps
from dpa4_jax import checkpoint

STEPS = 5
DT_FS = 1.0
THERMO = ("step", "pe", "c_pe_sum", "ke", "press", "vol", "lx", "ly", "lz", "xy", "xz", "yz",
          *(f"c_virial[{i}]" for i in range(1, 7)))


@pytest.fixture(scope="module")
def calc():
    return make_calc(seed=4)


@pytest.fixture(scope="module")
def metal():
    """LAMMPS's conversion constants of units metal (rounded: 1 g/mol Å²/ps² is 1.0364269e-4 eV)."""
    lmp = dpa4_lammps.lammps_instance(["-log", "none", "-screen", "none"])
    lmp.command("units metal")
    constants = {name: lmp.extract_global(name) for name in ("mvv2e", "nktv2p")}
    lmp.close()
    return constants


def write_input(directory: Path, atoms, elements, boundary: str, body: str) -> Path:
    """An input that reads ``atoms`` (with ASE's masses: its data file has them converted), dumps unwrapped positions and velocities and prints ``THERMO`` (with the
    virial-only pressure tensor ``c_virial``) at every step, then runs ``body``."""
    ase.io.write(directory / "start.data", atoms, format="lammps-data", specorder=elements, units="metal")
    masses = "\n".join(f"mass {t} {float(atomic_masses[atomic_numbers[e]])!r}" for t, e in enumerate(elements, start=1))
    thermo = " ".join(f"$({name}:%.17g)" for name in THERMO)
    text = f"""units metal
atom_style atomic
boundary {boundary}
read_data {directory / "start.data"}
{masses}
pair_style zero 4.0
pair_coeff * *
timestep {DT_FS / 1000}
compute virial all pressure NULL virial
compute pe_atom all pe/atom
compute pe_sum all reduce sum c_pe_atom
dump traj all custom 1 {directory / "traj.dump"} id xu yu zu vx vy vz
dump_modify traj sort id format float %.17g
fix thermo all print 1 "{thermo}" file {directory / "thermo.txt"} screen no
{body}
"""
    path = directory / "in.lammps"
    path.write_text(text)
    return path


def read_outputs(directory: Path, n_atoms: int):
    """``(thermo, positions, velocities)``: ``{name: (T,)}``, ``(T, N, 3)`` Å and Å/ps, by atom ID."""
    values = np.loadtxt(directory / "thermo.txt", ndmin=2)
    thermo = dict(zip(THERMO, values.T))
    lines = (directory / "traj.dump").read_text().splitlines()
    starts = [i + 1 for i, line in enumerate(lines) if line.startswith("ITEM: ATOMS")]
    atoms = np.array([[float(w) for w in line.split()] for s in starts for line in lines[s:s + n_atoms]])
    atoms = atoms.reshape(len(starts), n_atoms, 7)
    return thermo, atoms[..., 1:4], atoms[..., 4:7]


def lammps_cell(thermo, step=0) -> np.ndarray:
    t = {name: thermo[name][step] for name in ("lx", "ly", "lz", "xy", "xz", "yz")}
    return np.array([[t["lx"], 0, 0], [t["xy"], t["ly"], 0], [t["xz"], t["yz"], t["lz"]]])


def lammps_virial(thermo, metal, step=0) -> np.ndarray:
    """The virial ``(3, 3)`` (eV) from the virial-only pressure tensor (bar) and the volume."""
    xx, yy, zz, xy, xz, yz = (thermo[f"c_virial[{i}]"][step] for i in range(1, 7))
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]]) * thermo["vol"][step] / metal["nktv2p"]


def strain_virial(calc, atoms, h=1e-5) -> np.ndarray:
    """W = -dE/d(strain) by central differences (positions and cell strained together): the virial of any
    periodicity, with or without a stress from the calculator."""
    virial = np.zeros((3, 3))
    for a in range(3):
        for b in range(a, 3):
            energies = []
            for sign in (1, -1):
                strain = np.eye(3)
                strain[a, b] += sign * h / 2
                strain[b, a] += sign * h / 2
                strained = atoms.copy()
                strained.set_cell(atoms.cell.array @ strain, scale_atoms=False)
                strained.positions = atoms.positions @ strain
                strained.calc = calc
                energies.append(strained.get_potential_energy())
            virial[a, b] = virial[b, a] = -(energies[0] - energies[1]) / (2 * h)
    return virial


def methanol_chain():
    """Methanol molecules 4.5 Å apart along x (periodic: images within the cutoff), isolated along y and z."""
    atoms = methanol()
    atoms.center(vacuum=3.0)
    atoms.cell[0] = [4.5, 0.0, 0.0]
    atoms.pbc = (True, False, False)
    return atoms


NVE_CASES = {  # name: (atoms, LAMMPS boundary)
    "triclinic": (triclinic_cell, "p p p"),
    "methanol chain": (methanol_chain, "p s s"),
}


@pytest.fixture(scope="module", params=list(NVE_CASES))
def nve_run(request, calc, tmp_path_factory):
    """An NVE run of LAMMPS with the model: ``(atoms, pbc, thermo, positions, velocities)``."""
    make, boundary = NVE_CASES[request.param]
    atoms = make()
    directory = tmp_path_factory.mktemp("nve")
    elements = sorted(set(atoms.get_chemical_symbols()))
    body = f"velocity all create 600 7 dist gaussian\nfix nve all nve\nrun {STEPS}"
    evaluations = dpa4_lammps.run(write_input(directory, atoms, elements, boundary, body), calc, elements,
                                  ["-log", "none", "-screen", "none"])
    assert evaluations == STEPS + 1
    return (atoms, *read_outputs(directory, len(atoms)))


def test_nve_equals_ase_velocity_verlet(nve_run, calc, metal):
    """LAMMPS's velocity Verlet with the model = ASE's with DPA4Calculator, step for step (LAMMPS's units:
    ASE's masses carry LAMMPS's rounded g/mol Å²/ps² -> eV constant, so that both integrate the same
    equations)."""
    atoms, thermo, positions, velocities = nve_run
    ps = 1000 * units.fs
    mvv2e_ase = units._amu * 1e4 / units._e
    reference = Atoms(atoms.numbers, positions=positions[0], cell=lammps_cell(thermo), pbc=atoms.pbc,
                      masses=atoms.get_masses() * metal["mvv2e"] / mvv2e_ase, velocities=velocities[0] / ps)
    reference.calc = calc
    dynamics = VelocityVerlet(reference, timestep=DT_FS * units.fs)
    for step in range(STEPS + 1):
        if step:
            dynamics.run(1)
        np.testing.assert_allclose(positions[step], reference.positions, rtol=0, atol=1e-8)
        np.testing.assert_allclose(velocities[step], reference.get_velocities() * ps, rtol=0, atol=1e-8)
        assert thermo["pe"][step] == pytest.approx(reference.get_potential_energy(), rel=0, abs=1e-8)
        assert thermo["c_pe_sum"][step] == pytest.approx(thermo["pe"][step], rel=0, abs=1e-8)  # compute pe/atom
        assert thermo["ke"][step] == pytest.approx(reference.get_kinetic_energy(), rel=0, abs=1e-8)
    assert np.ptp(thermo["pe"]) > 1e-3  # the atoms moved on the model's surface


def test_virial_is_the_strain_derivative(nve_run, calc, metal):
    """LAMMPS's virial (its pressure tensor times the volume) = -dE/d(strain) of the model, for the periodic
    cell and for the chain periodic along x only (whose virial the calculator's stress does not give)."""
    atoms, thermo, positions, _ = nve_run
    structure = Atoms(atoms.numbers, positions=positions[0], cell=lammps_cell(thermo), pbc=atoms.pbc)
    np.testing.assert_allclose(lammps_virial(thermo, metal), strain_virial(calc, structure), rtol=0, atol=1e-6)


def test_npt_pressure(calc, metal, tmp_path):
    """An NPT run (Nosé-Hoover, isotropic barostat) from rest: ``press`` at step 0 is the calculator's
    pressure, the virial at each step that of the structure LAMMPS holds, and the barostat moves the volume
    towards the target pressure."""
    atoms = cu_au_cell()
    elements = ["Au", "Cu"]
    body = "fix npt all npt temp 300 300 0.05 iso 0 0 0.2\nrun 20"
    dpa4_lammps.run(write_input(tmp_path, atoms, elements, "p p p", body), calc, elements,
                    ["-log", "none", "-screen", "none"])
    thermo, positions, _ = read_outputs(tmp_path, len(atoms))
    atoms.calc = calc
    atoms.positions = positions[0]
    pressure = -atoms.get_stress()[:3].mean() * metal["nktv2p"]  # bar
    assert thermo["press"][0] == pytest.approx(pressure, rel=1e-10)
    assert abs(pressure) > 1e3
    for step in (0, 10, 20):
        structure = Atoms(atoms.numbers, positions=positions[step], cell=lammps_cell(thermo, step), pbc=True)
        structure.calc = calc
        virial = -structure.get_stress(voigt=False) * structure.get_volume()
        np.testing.assert_allclose(lammps_virial(thermo, metal, step), virial, rtol=0, atol=1e-8)
    assert np.all(np.isfinite(thermo["press"]))
    assert np.sign(thermo["vol"][-1] - thermo["vol"][0]) == np.sign(pressure)  # expands under pressure
    assert abs(thermo["press"][-1]) < abs(pressure)


BAD_INPUTS = {  # name: (input text, elements, message)
    "units real": ("units real\nregion b block 0 5 0 5 0 5\ncreate_box 1 b\nrun 1\n", ["Cu"], "units real"),
    "2d": ("dimension 2\nunits metal\nboundary p p p\nregion b block 0 5 0 5 -0.5 0.5\ncreate_box 1 b\n",
           ["Cu"], "dimension 2"),
    "elements per type": ("units metal\nregion b block 0 5 0 5 0 5\ncreate_box 2 b\n", ["Cu"],
                          "1 element(s) for 2 LAMMPS atom type(s)"),
    "element not in the model": ("units metal\nregion b block 0 5 0 5 0 5\ncreate_box 1 b\n", ["Fe"],
                                 "Fe not in the model's type map"),
    "label before the box": ("label loop\nunits metal\n", ["Cu"], "line 1: label before the simulation box"),
    "clear": ("units metal\nregion b block 0 5 0 5 0 5\ncreate_box 1 b\nclear\n", ["Cu"],
              "line 4: clear would delete"),
    "no box": ("units metal\n", ["Cu"], "no simulation box"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_refusals(name, calc, tmp_path):
    text, elements, message = BAD_INPUTS[name]
    (tmp_path / "in.lammps").write_text(text)
    with pytest.raises(dpa4_lammps.LammpsError, match=re.escape(message)):
        dpa4_lammps.run(tmp_path / "in.lammps", calc, elements, ["-log", "none", "-screen", "none"])


def test_model_error_stops_the_run(calc, tmp_path):
    """An error inside the callback (which cannot cross LAMMPS) stops the run at once and is raised."""
    class Failing(type(calc)):
        def calculate(self, *args, **kwargs):
            raise MemoryError("out of memory")

    failing = Failing(calc.config, calc.variables, dtype="float64")
    atoms = cu_au_cell()
    body = "fix nve all nve\nrun 1000\nrun 1000"
    path = write_input(tmp_path, atoms, ["Au", "Cu"], "p p p", body)
    with pytest.raises(RuntimeError, match="MemoryError: out of memory") as error:
        dpa4_lammps.run(path, failing, ["Au", "Cu"], ["-log", "none", "-screen", "none"])
    assert isinstance(error.value.__cause__, MemoryError)
    assert len(np.loadtxt(tmp_path / "thermo.txt", ndmin=2)) < 20  # both runs stopped within a few steps


def test_several_mpi_ranks_are_refused(calc, tmp_path):
    """Under mpiexec with 2 ranks the command line stops on every rank, before any model evaluation, and
    says why."""
    config = {"model": dataclasses.asdict(calc.config), "training": {"dtype": "float64"}}
    model = checkpoint.save_model(tmp_path, calc.variables, yaml.safe_dump(config))
    path = write_input(tmp_path, cu_au_cell(), ["Au", "Cu"], "p p p", "fix nve all nve\nrun 1")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    result = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-m", "dpa4_jax.lammps", str(path),
                             "--model", str(model), "--elements", "Au", "Cu", "--log", "none"],
                            check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("LAMMPS runs on 2 MPI ranks") == 2, result.stderr
    assert not (tmp_path / "thermo.txt").exists()

