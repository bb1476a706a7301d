"""One labelled atomic configuration (host-side NumPy container).

Units: Å for lengths, eV for energies, eV/Å for forces, eV for the virial.

Virial convention (DeePMD): ``virial = -volume * stress`` where ``stress`` has
ASE's sign (tensile positive, eV/Å^3).  Equivalently ``virial = -dE/dε`` for a
homogeneous strain ``ε`` (for a pair potential, ``virial = Σ r_ij ⊗ f_ij``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Frame", "FrameError", "UnreadableError", "stress_to_virial", "virial_to_stress", "voigt_to_3x3"]

# |det(cell)| below this (Å^3) counts as singular.
_MIN_VOLUME = 1e-6


class FrameError(ValueError):
    """Invalid frame data; the message starts with the frame's ``source``."""


class UnreadableError(FrameError):
    """A truncated or corrupted file (or DeePMD set): the frames from the named position on cannot be read."""


def _float_array(value, what: str, fail) -> np.ndarray:
    """``value`` as a float64 array; a ragged list or a non-number fails naming ``what``."""
    try:
        return np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        fail(f"{what} is not an array of numbers ({e})")


def voigt_to_3x3(stress) -> np.ndarray:
    """ASE Voigt order (xx, yy, zz, yz, xz, xy) or 3x3 -> symmetric 3x3 float64."""
    s = np.asarray(stress, dtype=np.float64)
    if s.shape == (6,):
        xx, yy, zz, yz, xz, xy = s
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    if s.size == 9:
        return s.reshape(3, 3).copy()
    raise ValueError(f"stress must have 6 (Voigt) or 9 components, got shape {s.shape}")


def stress_to_virial(stress, cell) -> np.ndarray:
    """``virial = -|det(cell)| * stress`` (stress: ASE sign, eV/Å^3, Voigt-6 or 3x3)."""
    volume = abs(float(np.linalg.det(np.asarray(cell, dtype=np.float64))))
    return -volume * voigt_to_3x3(stress)


def virial_to_stress(virial, cell) -> np.ndarray:
    """Inverse of :func:`stress_to_virial`: 3x3 stress in ASE sign, eV/Å^3."""
    volume = abs(float(np.linalg.det(np.asarray(cell, dtype=np.float64))))
    return -np.asarray(virial, dtype=np.float64).reshape(3, 3) / volume


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _atoms(numbers, positions, pbc, fail) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(numbers (N,) int64, positions (N, 3) float64, pbc (3,) bool)``, checked: integer atomic numbers of
    real elements, at least one atom, finite positions of the right shape."""
    try:
        numbers_in = np.asarray(numbers)
        if numbers_in.dtype.kind == "f" and not np.all(numbers_in == np.round(numbers_in)):
            fail("atomic numbers must be integers")
        numbers = np.array(numbers_in, dtype=np.int64).reshape(-1)
        positions = np.array(positions, dtype=np.float64)
        pbc = np.array(pbc, dtype=bool).reshape(-1)
    except (TypeError, ValueError) as e:
        if isinstance(e, FrameError):
            raise
        fail(f"cannot convert structure arrays: {e}")
    n = numbers.shape[0]
    if numbers_in.ndim != 1:
        fail(f"numbers must be 1-D, got shape {numbers_in.shape}")
    if n == 0:
        fail("frame has no atoms")
    if np.any(numbers < 1) or np.any(numbers > 118):
        bad = numbers[(numbers < 1) | (numbers > 118)][0]
        fail(f"invalid atomic number {bad}")
    if positions.shape != (n, 3):
        fail(f"positions have shape {positions.shape}, expected ({n}, 3) for {n} atoms")
    if not np.all(np.isfinite(positions)):
        i = int(np.argwhere(~np.isfinite(positions))[0, 0])
        fail(f"positions contain NaN/inf (atom {i})")
    if pbc.shape == (1,):
        pbc = np.repeat(pbc, 3)
    if pbc.shape != (3,):
        fail(f"pbc has shape {pbc.shape}, expected (3,)")
    return numbers, positions, pbc


def _cell(cell, pbc: np.ndarray, fail) -> np.ndarray:
    """``(3, 3)`` float64: non-singular when any direction is periodic, zeros when none is."""
    try:
        cell = np.array(cell, dtype=np.float64)
    except (TypeError, ValueError) as e:
        fail(f"cannot convert structure arrays: {e}")
    if cell.size == 9:
        cell = cell.reshape(3, 3)
    elif cell.shape == (3,):  # orthorhombic lengths, as ASE accepts
        cell = np.diag(cell)
    else:
        fail(f"cell has shape {cell.shape}, expected (3, 3)")
    if not np.all(np.isfinite(cell)):
        fail("cell contains NaN/inf")
    if not pbc.any():
        return np.zeros((3, 3))
    vol = abs(np.linalg.det(cell))
    if not vol > _MIN_VOLUME:
        fail(f"cell is singular (volume {vol:.3g} Å^3) but pbc={pbc.tolist()}")
    return cell


def _energy(energy, fail) -> float | None:
    if energy is None:
        return None
    try:
        e_arr = np.asarray(energy, dtype=np.float64)
    except (TypeError, ValueError):
        fail(f"energy {energy!r} is not a number")
    if e_arr.size != 1:
        fail(f"energy must be a scalar, got shape {e_arr.shape}")
    energy = float(e_arr.reshape(()))
    if not np.isfinite(energy):
        fail(f"energy is {energy}")
    return energy


def _forces(forces, n: int, fail) -> np.ndarray | None:
    if forces is None:
        return None
    forces = _float_array(forces, "forces", fail)
    if forces.size == 3 * n and forces.ndim == 1:
        forces = forces.reshape(n, 3)
    if forces.shape != (n, 3):
        fail(f"forces have shape {forces.shape}, expected ({n}, 3) for {n} atoms")
    if not np.all(np.isfinite(forces)):
        i = int(np.argwhere(~np.isfinite(forces))[0, 0])
        fail(f"forces contain NaN/inf (atom {i})")
    return forces


def _whole(value, what: str, fail) -> int | None:
    """An integer label (charge, spin multiplicity) given as any whole number, or None."""
    if value is None:
        return None
    try:
        number = float(np.asarray(value, dtype=np.float64).reshape(()))
    except (TypeError, ValueError):
        fail(f"{what} {value!r} is not a number")
    if not (np.isfinite(number) and number == round(number)):
        fail(f"{what} {value!r} is not a whole number")
    return int(number)


def _virial(virial, pbc: np.ndarray, fail) -> np.ndarray | None:
    if virial is None:
        return None
    virial = _float_array(virial, "virial", fail)
    if virial.size != 9:
        fail(f"virial has shape {virial.shape}, expected (3, 3)")
    virial = virial.reshape(3, 3)
    if not np.all(np.isfinite(virial)):
        fail("virial contains NaN/inf")
    if not pbc.any():
        fail("virial label given for a non-periodic frame")
    return virial


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Frame:
    """A labelled configuration.

    Arrays are copied on construction, converted to int64/float64/bool and made
    read-only.  ``cell`` is forced to zeros when ``pbc`` is all False (a cell
    given for a non-periodic frame carries no physics).  When any direction is
    periodic, the cell must be non-singular.  Labels (``energy``, ``forces``,
    ``virial``) are optional; a ``virial`` needs a periodic frame.

    ``eq=False``: frames compare by identity (element-wise array comparison is
    ambiguous); compare fields explicitly in tests.
    """

    numbers: np.ndarray  # (N,) int64 atomic numbers
    positions: np.ndarray  # (N, 3) float64, Å
    cell: np.ndarray  # (3, 3) float64, Å, rows are lattice vectors
    pbc: np.ndarray  # (3,) bool
    energy: float | None = None  # eV (total)
    forces: np.ndarray | None = None  # (N, 3) eV/Å
    virial: np.ndarray | None = None  # (3, 3) eV, = -volume * stress(ASE sign)
    source: str = ""  # "file:frame_index", for error messages
    config_type: str = ""  # subset name (extxyz info key ``config_type``, as in SPICE/MACE-OFF); "" for none
    charge: int | None = None  # total charge (e), for models with a charge/spin embedding; None: not given
    spin: int | None = None  # spin multiplicity 2S + 1 (OMol25's extxyz info key ``spin``); None: not given

    def __post_init__(self):
        src = self.source or "<frame>"

        def fail(msg):
            raise FrameError(f"{src}: {msg}")

        numbers, positions, pbc = _atoms(self.numbers, self.positions, self.pbc, fail)
        cell = _cell(self.cell, pbc, fail)
        checked = dict(numbers=numbers, positions=positions, cell=cell, pbc=pbc, energy=_energy(self.energy, fail),
                       forces=_forces(self.forces, len(numbers), fail), virial=_virial(self.virial, pbc, fail),
                       source=str(self.source), config_type=str(self.config_type),
                       charge=_whole(self.charge, "charge", fail), spin=_whole(self.spin, "spin", fail))
        for name, value in checked.items():
            object.__setattr__(self, name, _readonly(value) if isinstance(value, np.ndarray) else value)

    # ------------------------------------------------------------------ info
    @property
    def natoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def volume(self) -> float:
        """|det(cell)| in Å^3 (0 for a non-periodic frame)."""
        return abs(float(np.linalg.det(self.cell)))

    @property
    def stress(self) -> np.ndarray | None:
        """3x3 stress in ASE sign (tensile positive), eV/Å^3, from the virial."""
        if self.virial is None:
            return None
        return virial_to_stress(self.virial, self.cell)

    def __repr__(self) -> str:
        from ase.symbols import Symbols

        labels = [k for k in ("energy", "forces", "virial") if getattr(self, k) is not None]
        return (
            f"Frame({Symbols(self.numbers).get_chemical_formula()}, natoms={self.natoms}, "
            f"pbc={self.pbc.tolist()}, labels={labels}, source={self.source!r})"
        )

    # ------------------------------------------------------------ ASE bridge
    @classmethod
    def from_atoms(cls, atoms, energy=None, forces=None, stress=None, virial=None, source="",
                   config_type="") -> "Frame":
        """Build a Frame from an ``ase.Atoms``.

        Labels are taken only from the arguments (not from ``atoms.calc``); the total charge and spin
        multiplicity from ``atoms.info["charge"]``, ``atoms.info["spin"]`` when there.
        ``stress``: ASE sign (tensile positive), eV/Å^3, Voigt-6 or 3x3; it is
        converted to ``virial = -V * stress``.  Give ``stress`` or ``virial``,
        not both.  A stress on a fully non-periodic frame is an error.
        """
        if stress is not None and virial is not None:
            raise FrameError(f"{source or '<frame>'}: give stress or virial, not both")
        cell = np.array(atoms.cell.array, dtype=np.float64)
        pbc = np.array(atoms.pbc, dtype=bool)
        if stress is not None:
            if not pbc.any():
                raise FrameError(f"{source or '<frame>'}: stress label given for a non-periodic frame")
            try:
                virial = stress_to_virial(stress, cell)
            except ValueError as e:
                raise FrameError(f"{source or '<frame>'}: {e}") from None
        return cls(
            numbers=atoms.numbers,
            positions=atoms.positions,
            cell=cell,
            pbc=pbc,
            energy=energy,
            forces=forces,
            virial=virial,
            source=source,
            config_type=config_type,
            charge=atoms.info.get("charge"),
            spin=atoms.info.get("spin"),
        )

    def to_atoms(self):
        """``ase.Atoms`` with a SinglePointCalculator holding the labels
        (energy, forces, stress in ASE Voigt-6 form) when present."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator
        from ase.stress import full_3x3_to_voigt_6_stress

        atoms = Atoms(
            numbers=np.array(self.numbers),
            positions=np.array(self.positions),
            cell=np.array(self.cell),
            pbc=np.array(self.pbc),
        )
        results = {}
        if self.energy is not None:
            results["energy"] = self.energy
        if self.forces is not None:
            results["forces"] = np.array(self.forces)
        if self.virial is not None:
            results["stress"] = full_3x3_to_voigt_6_stress(self.stress)
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        if self.source:
            atoms.info["source"] = self.source
        if self.config_type:
            atoms.info["config_type"] = self.config_type
        for key in ("charge", "spin"):
            if getattr(self, key) is not None:
                atoms.info[key] = getattr(self, key)
        return atoms
