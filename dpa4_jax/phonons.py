"""Phonons and lattice thermal conductivity of a DPA4 model, through phonopy and phono3py.

phono3py does the symmetry, the displacements, the force constants and the Boltzmann/Wigner transport; the
model gives the forces of the displaced supercells, many supercells per call (``batched.forces_of_many``), or
the second-order force constants exactly, as the Hessian of its energy (``DPA4Calculator.get_hessian``)::

    python -m dpa4_jax.phonons --model runs/demo --structure POSCAR --supercell 2 2 2 --mesh 11 11 11 \\
        --temperature 300 --output kappa/Si

relaxes (``--relax``: symmetry kept, cell and positions, ``FIRE`` to ``--fmax``), writes ``fc2.hdf5``,
``fc3.hdf5``, phono3py's ``kappa-m*.hdf5`` and ``phono3py_params.yaml`` (structure, displacements, forces),
and prints κ in the relaxation-time approximation (RTA, the particle-like κ_P) and in the Wigner formulation
(κ_P + the coherences' κ_C), W/(m K), with the number of supercells evaluated and the time. The output folder
appears only when all of it is written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms

from dpa4_jax.batched import forces_of_many
from dpa4_jax.calculator import DPA4Calculator
from dpa4_jax.checkpoint import atomic_dir
from dpa4_jax.elements import species_indices

log = logging.getLogger(__name__)

SYMPREC = 1e-5  # the Matbench Discovery κ protocol's spglib tolerance
DISTANCE = 0.03  # Å, displacement (phono3py's default; DPA4's Matbench submission used it too)
FMAX, MAX_STEPS = 1e-4, 300  # the protocol's relaxation: eV/Å, FIRE steps at most
GAMMA_ACOUSTIC_TOLERANCE = -0.01  # THz: the protocol lets Γ's acoustic modes go this far below zero


class SupercellError(ValueError):
    """A supercell too small for the force constants of the model: the message names it."""


class ImaginaryModesError(ValueError):
    """Imaginary phonon modes on the q-point mesh: the message lists q-points and frequencies."""


# ---------------------------------------------------------------------------------------------------- structures
def to_phonopy(atoms: Atoms):
    from phonopy.structure.atoms import PhonopyAtoms

    return PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=atoms.cell.array,
                        scaled_positions=atoms.get_scaled_positions(wrap=False))


def to_ase(cell) -> Atoms:
    return Atoms(cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions, pbc=True)


def supercell_matrix(values) -> np.ndarray:
    """``(3, 3)`` integer matrix from 3 (diagonal) or 9 (row-major) integers."""
    values = np.asarray(values, dtype=int).reshape(-1)
    if values.size == 3:
        return np.diag(values)
    if values.size == 9:
        return values.reshape(3, 3)
    raise SupercellError(f"a supercell is 3 or 9 integers, got {values.tolist()}")


def check_supercell(cell, min_length: float, what: str):
    """The shortest lattice vector L of a supercell must reach ``min_length`` (the CLI's default: twice the model's
    cutoff). Below it, an atom's neighbour at r and that neighbour's image at r - L are one atom of the supercell:
    its force constants sum both pairs, and the odd-order ones (FC3) of pairs at r and -r cancel (fcc Cu in a
    2x2x2 supercell of the primitive cell has FC3 = 0 to round-off, for any potential)."""
    from ase.geometry import minkowski_reduce

    reduced, _ = minkowski_reduce(np.asarray(cell.cell))
    shortest = float(np.linalg.norm(reduced, axis=1).min())
    if shortest < min_length:
        raise SupercellError(f"{what} supercell ({len(cell)} atoms): its shortest lattice vector is {shortest:.3f} Å, "
                             f"less than {min_length:g} Å: a neighbour and its periodic image within that distance "
                             "fold onto one atom (their FC3 cancels): use a larger supercell")


def init_phono3py(atoms: Atoms, supercell, fc2_supercell=None, mesh=(11, 11, 11), distance: float = DISTANCE,
                  symprec: float = SYMPREC, min_length: float | None = None):
    """A ``Phono3py`` of ``atoms`` (primitive cell found by phonopy) with its displacements generated;
    ``fc2_supercell`` None: FC2 from the FC3 supercell. ``min_length``: checked by :func:`check_supercell`
    against both supercells."""
    from phono3py import Phono3py

    ph3 = Phono3py(to_phonopy(atoms), supercell_matrix=supercell_matrix(supercell),
                   phonon_supercell_matrix=None if fc2_supercell is None else supercell_matrix(fc2_supercell),
                   primitive_matrix="auto", symprec=symprec)
    if min_length is not None:
        check_supercell(ph3.supercell, min_length, "FC3")
        check_supercell(ph3.phonon_supercell, min_length, "FC2")
    ph3.mesh_numbers = mesh
    ph3.generate_displacements(distance=distance)
    return ph3


# ---------------------------------------------------------------------------------------------- force constants
def supercell_forces(calc, supercells, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
    """``(M, N, 3)`` forces of phono3py's displaced supercells (``None``, a supercell phono3py skips: zeros)."""
    present = [i for i, c in enumerate(supercells) if c is not None]
    n_atoms = len(supercells[present[0]]) if present else 0
    forces = np.zeros((len(supercells), n_atoms, 3))
    computed = forces_of_many(calc, [to_ase(supercells[i]) for i in present], batch_size, progress)
    forces[present] = np.asarray(computed).reshape(len(present), n_atoms, 3)
    return forces


def fc2_from_hessian(calc, supercell, p2s_map=None) -> np.ndarray:
    """phonopy's FC2 of a supercell (``PhonopyAtoms``), ``Phi[i, j, a, b] = d^2 E / du_ia du_jb`` (eV/Å^2), from the
    model's exact Hessian, not symmetrised: ``(N, N, 3, 3)``, or compact ``(n, N, 3, 3)`` with the rows of the
    primitive cell's atoms ``p2s_map``."""
    n = len(supercell)
    fc2 = calc.get_hessian(to_ase(supercell)).reshape(n, 3, n, 3).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(fc2 if p2s_map is None else fc2[p2s_map])


def produce_fc2(calc, ph3, method: str = "displacements", batch_size: int | None = None,
                progress: bool = False) -> int:
    """Set ``ph3.fc2`` from the model (``"displacements"``: phono3py's FC2 displacements, batched, symmetrised
    by phono3py as the protocol does; ``"hessian"``: :func:`fc2_from_hessian`). Returns the supercells
    evaluated."""
    if method == "hessian":
        ph3.fc2 = fc2_from_hessian(calc, ph3.phonon_supercell, ph3.phonon_primitive.p2s_map)
        return 0
    if method != "displacements":
        raise ValueError(f"FC2 method must be 'displacements' or 'hessian', got {method!r}")
    if ph3.phonon_supercell_matrix is None:  # FC2 from the FC3 dataset: these forces serve FC3 too
        supercells = ph3.supercells_with_displacements
        ph3.forces = supercell_forces(calc, supercells, batch_size, progress)
    else:
        supercells = ph3.phonon_supercells_with_displacements
        ph3.phonon_forces = supercell_forces(calc, supercells, batch_size, progress)
    ph3.produce_fc2(symmetrize_fc2=True)
    return len(supercells)


def produce_fc3(calc, ph3, batch_size: int | None = None, progress: bool = False) -> int:
    """Set ``ph3.fc3`` from the forces of phono3py's displaced supercells, batched (symmetrised by phono3py as
    the protocol does); returns the supercells evaluated (0 if :func:`produce_fc2` computed them already)."""
    done = ph3.forces is not None
    if not done:
        ph3.forces = supercell_forces(calc, ph3.supercells_with_displacements, batch_size, progress)
    ph3.produce_fc3(symmetrize_fc3r=True)
    return 0 if done else len(ph3.supercells_with_displacements)


# ------------------------------------------------------------------------------------------------ phonons, kappa
def imaginary_modes(ph3, gamma_tolerance: float = GAMMA_ACOUSTIC_TOLERANCE) -> list[tuple[np.ndarray, float]]:
    """``[(q, frequency THz)]`` of the imaginary (negative) modes on ``ph3``'s mesh as the Matbench Discovery
    protocol flags them: any mode below 0 away from Γ, an optical mode below 0 at Γ, an acoustic one below
    ``gamma_tolerance`` (q in reduced coordinates of the primitive cell's reciprocal lattice)."""
    ph3.init_phph_interaction(symmetrize_fc3q=False)
    ph3.run_phonon_solver()
    frequencies, _, grid_address = ph3.get_phonon_data()
    bad = frequencies < 0
    bad[0] = np.concatenate([frequencies[0, :3] < gamma_tolerance, frequencies[0, 3:] < 0])
    if np.isnan(frequencies).all():
        bad[:] = True
    q = grid_address / np.asarray(ph3.mesh_numbers, dtype=float)
    return [(q[i], float(frequencies[i, j])) for i, j in zip(*np.nonzero(bad))]


def describe_modes(modes, limit: int = 5) -> str:
    worst = sorted(modes, key=lambda m: m[1])[:limit]
    shown = "; ".join(f"q = ({q[0]:.3f}, {q[1]:.3f}, {q[2]:.3f}): {f:.4f} THz" for q, f in worst)
    return f"{len(modes)} imaginary mode(s) (negative frequencies), lowest: {shown}"


def conductivity(ph3, temperatures, is_isotope: bool = True, boundary_mfp: float = 1e6, sigma: float | None = None,
                 write_to=None):
    """phono3py's Wigner conductivity in the RTA (``transport_type="SMM19"``, Simoncelli, Marzari and Mauri 2019;
    phono3py 3's ``conductivity_type="wigner"``) at ``temperatures`` (K), with isotope scattering and a boundary
    mean free path (µm) as in the protocol; ``sigma``: a Gaussian smearing width (THz) of the energy conservation
    in place of the protocol's tetrahedron method (whose weights jump where two frequencies coincide exactly, so
    that on a small symmetric mesh κ is not a continuous function of the force constants); ``write_to``: a
    folder for phono3py's ``kappa-m*.hdf5``. Returns the
    conductivity object: ``kappa_intra`` (the particle-like RTA κ_P), ``kappa_inter`` (the coherences' κ_C),
    ``kappa`` (κ_P + κ_C), each ``(1, T, 6)`` in W/(m K), xx yy zz yz xz xy; ``mode_kappa_matrix``
    ``(1, T, q, band, band, 6)``."""
    ph3.sigmas = [sigma]
    ph3.init_phph_interaction(symmetrize_fc3q=False)
    with contextlib.chdir(write_to) if write_to is not None else contextlib.nullcontext():
        ph3.run_thermal_conductivity(temperatures=list(temperatures), is_isotope=is_isotope,
                                     transport_type="SMM19", boundary_mfp=boundary_mfp,
                                     write_kappa=write_to is not None)
    return ph3.thermal_conductivity


def relax(atoms: Atoms, calc, fmax: float = FMAX, steps: int = MAX_STEPS, symprec: float = SYMPREC) -> tuple[Atoms, int]:
    """The protocol's relaxation: ``FixSymmetry``, ``FrechetCellFilter`` on the cell's diagonal strains, ``FIRE``
    to ``fmax`` (eV/Å) or ``steps``. Returns the relaxed copy and the steps taken."""
    from ase.constraints import FixSymmetry
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    atoms = atoms.copy()
    atoms.calc = calc
    atoms.set_constraint(FixSymmetry(atoms, symprec=symprec))
    optimizer = FIRE(FrechetCellFilter(atoms, mask=[True] * 3 + [False] * 3), logfile=None)
    optimizer.run(fmax=fmax, steps=steps)
    atoms.calc, atoms.constraints = None, []
    return atoms, optimizer.nsteps


def read_structure(path: str | Path) -> Atoms:
    """The first structure of a file ASE reads (POSCAR, CIF, extxyz, ...), periodic; errors name the file."""
    import ase.io

    try:
        atoms = ase.io.read(path)
    except FileNotFoundError:
        raise ValueError(f"structure file {path}: no such file") from None
    except Exception as e:  # ASE's readers raise many kinds of errors on a malformed file
        raise ValueError(f"structure file {path} could not be read: {type(e).__name__}: {e}") from None
    if not atoms.pbc.all() or len(atoms) == 0:
        raise ValueError(f"structure file {path}: phonons need a periodic crystal, got {len(atoms)} atoms "
                         f"with pbc={atoms.pbc.tolist()}")
    return atoms


# ----------------------------------------------------------------------------------------------------------- CLI
def run(calc, atoms: Atoms, output: Path, supercell, fc2_supercell=None, mesh=(11, 11, 11), temperatures=(300.0,),
        distance: float = DISTANCE, fc2: str = "displacements", batch_size: int | None = None,
        ignore_imaginary: bool = False, min_length: float | None = None, sigma: float | None = None,
        progress: bool = True):
    """FC2, FC3 and κ of ``atoms`` written into ``output`` (which must not exist; it appears complete or not at
    all). Returns ``(conductivity, supercells evaluated)``; imaginary modes stop it (``ImaginaryModesError``)
    unless ``ignore_imaginary``; supercells with a lattice vector shorter than ``min_length`` (default: twice the
    model's cutoff) stop it (``SupercellError``); ``sigma``: see :func:`conductivity`."""
    from phono3py.file_IO import write_fc2_to_hdf5, write_fc3_to_hdf5

    output = Path(output)
    if output.exists():
        raise FileExistsError(f"output folder {output} exists: remove it or choose another")
    species_indices(atoms.numbers, calc.config.type_map, f"structure {atoms.get_chemical_formula()}")
    min_length = 2 * calc.config.rcut if min_length is None else min_length
    ph3 = init_phono3py(atoms, supercell, fc2_supercell, mesh, distance, min_length=min_length)
    evaluated = produce_fc2(calc, ph3, fc2, batch_size, progress)
    modes = imaginary_modes(ph3)
    if modes and not ignore_imaginary:
        raise ImaginaryModesError(f"{atoms.get_chemical_formula()}: {describe_modes(modes)}; FC3 and κ not computed "
                                  "(--ignore-imaginary computes them anyway)")
    evaluated += produce_fc3(calc, ph3, batch_size, progress)
    results = {}

    def write(folder: Path):
        write_fc2_to_hdf5(ph3.fc2, filename=str(folder / "fc2.hdf5"), p2s_map=ph3.phonon_primitive.p2s_map)
        write_fc3_to_hdf5(ph3.fc3, filename=str(folder / "fc3.hdf5"), p2s_map=ph3.primitive.p2s_map)
        ph3.save(folder / "phono3py_params.yaml")
        results["kappa"] = conductivity(ph3, temperatures, sigma=sigma, write_to=folder)

    atomic_dir(output, write)
    kappa = results["kappa"]
    return kappa, evaluated


def format_kappa(kappa) -> str:
    """κ per temperature: RTA (particle-like κ_P) and Wigner (κ_P + κ_C), xx yy zz yz xz xy in W/(m K)."""
    lines = ["T (K)   kind              xx        yy        zz        yz        xz        xy   (W/m-K)"]
    for i, t in enumerate(kappa.temperatures):
        for kind, k in (("RTA (κ_P)", kappa.kappa_intra), ("Wigner (κ_P+κ_C)", kappa.kappa)):
            lines.append(f"{t:6.1f}  {kind:16s}" + "".join(f"{v:10.4g}" for v in k[0, i]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="dpa4-jax run or model directory, or a DeePMD-kit DPA4 model file")
    p.add_argument("--structure", required=True, help="unit cell, any file ASE reads (POSCAR, CIF, extxyz, ...)")
    p.add_argument("--supercell", type=int, nargs="+", required=True, help="FC3 supercell: 3 or 9 integers")
    p.add_argument("--fc2-supercell", type=int, nargs="+", help="FC2 supercell (default: the FC3 one)")
    p.add_argument("--mesh", type=int, nargs=3, default=[11, 11, 11], help="q-point mesh")
    p.add_argument("--temperature", type=float, nargs="+", default=[300.0], help="K")
    p.add_argument("--output", required=True, help="folder to create")
    p.add_argument("--distance", type=float, default=DISTANCE, help="displacement (Å)")
    p.add_argument("--fc2", choices=["displacements", "hessian"], default="displacements",
                   help="FC2 from displaced supercells (phono3py) or from the model's exact Hessian")
    p.add_argument("--relax", action="store_true", help="relax first, symmetry kept (FIRE to --fmax)")
    p.add_argument("--fmax", type=float, default=FMAX, help="eV/Å")
    p.add_argument("--max-steps", type=int, default=MAX_STEPS)
    p.add_argument("--batch-size", type=int, help="supercells per model call (default: ~512 atoms a call)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--ignore-imaginary", action="store_true", help="compute FC3 and κ despite imaginary modes")
    p.add_argument("--sigma", type=float,
                   help="Gaussian smearing width (THz) instead of the tetrahedron method (phono3py's --sigma)")
    p.add_argument("--min-length", type=float,
                   help="shortest supercell lattice vector accepted, Å (default: twice the model's cutoff)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        if Path(args.output).exists():
            raise FileExistsError(f"output folder {args.output} exists: remove it or choose another")
        atoms = read_structure(args.structure)
        calc = DPA4Calculator.load(args.model, dtype=args.dtype)
        if args.relax:
            atoms, steps = relax(atoms, calc, args.fmax, args.max_steps)
            print(f"relaxed in {steps} FIRE steps" + (" (step limit reached)" if steps >= args.max_steps else ""))
        kappa, evaluated = run(calc, atoms, Path(args.output), args.supercell, args.fc2_supercell, args.mesh,
                               args.temperature, args.distance, args.fc2, args.batch_size, args.ignore_imaginary,
                               args.min_length, args.sigma)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_kappa(kappa))
    print(f"{evaluated} supercells evaluated, {time.perf_counter() - start:.1f} s; written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
