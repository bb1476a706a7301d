"""Convert data files into a frame store: ``python -m dpa4_jax.data.prepare SRC [SRC ...] OUT --cutoff 6.0``.

Sources are anything :func:`dpa4_jax.data.read_frames` reads (extxyz, DeePMD npy folders, the MPtrj JSON),
concatenated in the order given. The cutoff must be the model's ``rcut``: the store records each frame's edge
count at that cutoff, from which training plans its batches.
"""

from __future__ import annotations

import argparse
import time

from .store import default_workers, prepare


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dpa4_jax.data.prepare", description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", metavar="SRC [SRC ...] OUT", help="data files or folders, then the store")
    p.add_argument("--cutoff", type=float, required=True, help="neighbour cutoff in Å (the model's rcut)")
    p.add_argument("--format", choices=["extxyz", "deepmd", "mptrj"], help="source format (default: guessed)")
    p.add_argument("--energy-key", help="energy label: an extxyz key (REF_energy) or an MPtrj key "
                                        "(uncorrected_total_energy, corrected_total_energy, energy_per_atom)")
    p.add_argument("--forces-key", help="extxyz forces key")
    p.add_argument("--stress-key", help="extxyz stress key")
    p.add_argument("--min-pair-dist", type=float, default=0.1,
                   help="a frame with two atoms closer than this (Å) is bad (default %(default)s)")
    p.add_argument("--on-bad-frame", choices=["error", "skip"], default="error",
                   help="stop at a bad frame, naming it, or skip bad frames with one warning (default %(default)s)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes counting edges (default: the usable cores, %(default)s here)")
    p.add_argument("--max-frames", type=int, help="stop after this many frames (a subset for trial runs)")
    args = p.parse_args(argv)
    if len(args.paths) < 2:
        p.error("give at least one source and the output directory")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    *sources, out = args.paths
    keys = {k: v for k, v in dict(energy_key=args.energy_key, forces_key=args.forces_key,
                                  stress_key=args.stress_key).items() if v is not None}
    start = time.perf_counter()
    store = prepare(sources, out, args.cutoff, format=args.format, workers=args.workers,
                    max_frames=args.max_frames, min_pair_dist=args.min_pair_dist, on_bad_frame=args.on_bad_frame,
                    **keys)
    print(f"{store.path}: {len(store):,} frames, {int(store.n_atoms.sum()):,} atoms, "
          f"{int(store.n_edges.sum()):,} edges at {store.cutoff} Å, in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
