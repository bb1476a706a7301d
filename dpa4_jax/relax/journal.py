"""Results of a relaxation run written as they come, so that a killed run started again skips what is done.

One JSON line per finished structure, appended and flushed at once (a kill can cut only the last line, which
is dropped on reading); the first line holds the run's settings, and a journal written with other settings is
refused. Floats go through ``repr``, so results read back are bit for bit those written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

log = logging.getLogger(__name__)


def fingerprint(atoms: Atoms) -> str:
    """A short hash of a structure's numbers, positions, cell and pbc (to match journal lines to the input)."""
    h = hashlib.sha1()
    for array in (atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


def result_atoms(atoms: Atoms, record: dict) -> Atoms:
    """A copy of the input ``atoms`` carrying a result record: relaxed positions and cell, a
    ``SinglePointCalculator`` (energy, forces, stress), ``info["steps"]``, ``info["converged"]`` and, for a
    structure that failed, ``info["error"]`` (then no calculator)."""
    out = atoms.copy()
    out.info.update(steps=int(record["steps"]), converged=bool(record["converged"]))
    if record.get("error"):
        out.info["error"] = record["error"]
        return out
    out.set_cell(np.asarray(record["cell"]), scale_atoms=False)
    out.positions = np.asarray(record["positions"])
    results = {"energy": record["energy"], "free_energy": record["energy"], "forces": np.asarray(record["forces"])}
    if record.get("stress") is not None:
        results["stress"] = np.asarray(record["stress"])
    out.calc = SinglePointCalculator(out, **results)
    return out


class Journal:
    """An append-only file of result records, read back on opening.

    Args:
      path: the journal file (created with its parent directory if missing).
      settings: the run's settings (JSON-serialisable); an existing journal must have been written with equal ones.
    """

    def __init__(self, path: str | Path, settings: dict):
        self.path = Path(path)
        self.records: dict[int, dict] = {}
        header = json.loads(json.dumps({"settings": settings}))
        good_bytes = 0
        if self.path.exists():
            with open(self.path, "rb") as fh:
                lines = fh.read().split(b"\n")
            for number, line in enumerate(lines[:-1]):  # the part after the last newline is a cut line, if any
                entry = json.loads(line)
                if number == 0 and entry != header:
                    raise ValueError(f"{self.path}: written with other settings ({entry.get('settings')}) than this "
                                     f"run's ({settings}); remove it to start again")
                if number > 0:
                    self.records[entry["index"]] = entry
                good_bytes += len(line) + 1
            if lines[-1]:
                log.warning("%s: dropped a cut last line (%d bytes) of a killed run", self.path, len(lines[-1]))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        self._file.truncate(good_bytes)
        if good_bytes == 0:
            self._append(header)

    def _append(self, entry: dict) -> None:
        self._file.write((json.dumps(entry) + "\n").encode())
        self._file.flush()

    def check(self, index: int, key: str) -> dict | None:
        """The record of input structure ``index`` if it is done; an error if the journal's structure differs."""
        record = self.records.get(index)
        if record is not None and record["key"] != key:
            raise ValueError(f"{self.path}: structure {index} differs from the one this journal relaxed; "
                             "remove the journal to start again")
        return record

    def write(self, record: dict) -> None:
        self.records[record["index"]] = record
        self._append(record)

    def close(self) -> None:
        os.fsync(self._file.fileno())
        self._file.close()
