"""Relax every structure of a file, many at once (``dpa4_jax.relax.relax``).

    python -m dpa4_jax.relax --model runs/demo --input structures.extxyz --output relaxed.extxyz \\
        [--fmax 0.05 --max-steps 500 --no-cell-filter]

``--model`` is what ``DPA4Calculator`` loads: a run or model directory of ``train.py``, or a DeePMD-kit DPA4
model (``.pt``, ``.dp``, ``.yaml``). ``--input`` is any file ASE reads (all its frames). The output (extxyz)
holds each relaxed structure, in input order, with its energy, forces, stress, ``steps``, ``converged`` and its
place in the input (``index``); a structure that could not be relaxed keeps its input geometry and carries
``error``. Results go to ``OUTPUT.journal`` as they come: a run killed and started again skips the structures
done. Several processes (``jax.distributed``, e.g. ``srun``) each take every P-th structure and write their own
shard, ``relaxed.p0-of-4.extxyz`` and so on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import ase.io

from dpa4_jax.calculator import DPA4Calculator
from dpa4_jax.logs import setup_logging


def shard_path(output: Path, process: int, processes: int) -> Path:
    """This process's output file: ``output`` itself for one process, ``stem.pI-of-P.suffix`` for several."""
    return output if processes == 1 else output.with_name(f"{output.stem}.p{process}-of-{processes}{output.suffix}")


def write_atomically(path: Path, write) -> None:
    """``write(temporary path)``, then a rename to ``path``: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def add_relax_options(p: argparse.ArgumentParser, fmax: float = 0.05, max_steps: int = 500) -> None:
    """The relaxation options shared with ``python -m dpa4_jax.matbench discovery``."""
    p.add_argument("--model", required=True, help="train.py run or model directory, or a DeePMD-kit DPA4 model file")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="the model's precision (default: the run's; float32 for DeePMD-kit files)")
    p.add_argument("--fmax", type=float, default=fmax, help=f"force criterion, eV/A (default {fmax})")
    p.add_argument("--max-steps", type=int, default=max_steps, help=f"FIRE steps at most (default {max_steps})")
    p.add_argument("--skin", type=float, default=None, help="neighbour-list skin, A (default 0.1 on CPU, 0.5 on an "
                   "accelerator)")
    p.add_argument("--batch-atoms", type=int, default=None, help="atoms per batch and device (default 512 on CPU, "
                   "8192 on an accelerator)")
    p.add_argument("--batch-edges", type=int, default=None, help="edges per batch and device (default: from the "
                   "first structures' edges per atom)")
    p.add_argument("--no-progress", action="store_true")


def batch_options(args) -> dict:
    """``relax`` keyword arguments of the options of :func:`add_relax_options` (fmax and max steps aside)."""
    return {"skin": args.skin, "batch_atoms": args.batch_atoms, "batch_edges": args.batch_edges,
            "progress": not args.no_progress}


def this_process() -> tuple[int, int]:
    """``(process index, process count)`` after ``jax.distributed`` has connected the processes, if several."""
    from dpa4_jax.train import distributed

    distributed.initialize()
    import jax

    return jax.process_index(), jax.process_count()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpa4_jax.relax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_relax_options(p)
    p.add_argument("--input", required=True, help="structures, any file ASE reads (all frames)")
    p.add_argument("--output", required=True, type=Path, help="relaxed structures (extxyz)")
    p.add_argument("--no-cell-filter", action="store_true", help="relax positions only (FIRE(atoms))")
    p.add_argument("--scalar-pressure", type=float, default=0.0, help="pressure of the cell filter, eV/A^3")
    args = p.parse_args(argv)
    setup_logging()
    from dpa4_jax.relax import relax

    process, processes = this_process()
    output = shard_path(args.output, process, processes)
    journal = output.with_name(output.name + ".journal")
    if output.exists() and not journal.exists():
        print(f"{output} exists: nothing to do (remove it to relax again)")
        return 0
    frames = ase.io.read(args.input, index=":")
    for i, atoms in enumerate(frames):
        atoms.info["index"] = i
    mine = frames[process::processes]
    calc = DPA4Calculator.load(args.model, dtype=args.dtype)
    start = time.perf_counter()
    relaxed = relax(calc, mine, fmax=args.fmax, max_steps=args.max_steps, cell_filter=not args.no_cell_filter,
                    scalar_pressure=args.scalar_pressure, journal=journal, **batch_options(args))
    write_atomically(output, lambda tmp: ase.io.write(tmp, relaxed, format="extxyz"))
    journal.unlink()
    converged = sum(bool(a.info["converged"]) for a in relaxed)
    print(f"{output}: {len(relaxed)} structures, {converged} converged, {len(relaxed.errors)} failed, "
          f"{relaxed.steps} FIRE steps in {time.perf_counter() - start:.1f} s, {relaxed.compilations} compilation(s)")
    for i, message in relaxed.errors.items():
        print(f"  input structure {mine[i].info['index']}: {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
