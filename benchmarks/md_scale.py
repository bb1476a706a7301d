"""JAX-MD NVE of a large crystal with the cell-list neighbour search: speed and memory.

What runs: velocity Verlet (``jax_md.simulate.nve``, float32, 1 fs) of a rattled fcc Cu
supercell (``--repeats``, default 10 x 20 x 25 cubic cells = 20,000 atoms) at ``--temperature``
K, through ``dpa4_jax.jax_md``: ``neighbor_list`` (which picks the cell list here),
``energy_fn`` and ``run`` (``--chunk`` steps per jitted ``lax.scan``). The model is a tiny
random one (``MODEL``; zero-initialised weights filled with 0.1 N(0, 1) so that the atoms
feel forces) with a 3 A cutoff, which holds the 12 nearest neighbours of fcc Cu.

Reported: atoms, edges, steps/s after the first (compiling) chunk, the process's peak
resident memory, the neighbour list's own arrays and the scratch memory XLA plans for one
rebuild (``memory_analysis`` of the compiled update), next to what the multi-image
search would plan at the same size (compiled, never run), and the total-energy drift.

    python benchmarks/md_scale.py                         # 20,000 atoms, 40 steps
    python benchmarks/md_scale.py --repeats 8 8 8 --steps 20

Writes ``benchmarks/results/md_scale.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import time
import warnings

from common import RESULTS, fill_zero_weights, header, machine, set_threads, write_json

MODEL = dict(type_map=("Cu",), channels=8, lmax=1, mmax=1, n_blocks=1, mixing_layers=1, n_radial=4, rcut=3.0,
             n_focus=1, radial_so2_rank=1)
LATTICE_A = 3.61  # fcc Cu (A); neighbour shells at 2.55, 3.61 A: the 3 A cutoff plus skin keeps the first


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, nargs=3, default=[10, 20, 25], help="cubic fcc cells along a, b, c")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--chunk", type=int, default=10, help="steps per jitted lax.scan")
    p.add_argument("--dt-fs", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=300.0)
    p.add_argument("--skin", type=float, default=0.3, help="neighbour-list skin (dr_threshold, A)")
    p.add_argument("--threads", type=int, default=2, help="CPU cores the process is pinned to")
    p.add_argument("--output", default=str(RESULTS / "md_scale.json"))
    return p.parse_args()


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))


def nbytes(tree) -> int:
    import jax

    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def main():
    args = parse_args()
    host = machine()  # before pinning
    set_threads(args.threads)
    import jax
    import jax.numpy as jnp
    from ase import units
    from ase.build import bulk
    from jax_md import quantity, simulate, space

    from dpa4_jax import jax_md as djm
    from dpa4_jax.calculator import DPA4Calculator
    from dpa4_jax.config import ModelConfig

    # JAX-MD sums kinetic energies in float64, which JAX (without x64) truncates to float32 with a warning.
    warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
    config = ModelConfig(**MODEL)
    fresh = DPA4Calculator.from_config(config, seed=0, dtype="float32")
    calc = DPA4Calculator(config, dict(fresh.variables, params=fill_zero_weights(fresh.params)), dtype="float32")

    atoms = bulk("Cu", "fcc", a=LATTICE_A, cubic=True) * tuple(args.repeats)
    atoms.rattle(0.05, seed=0)
    n = len(atoms)
    positions, box, species = djm.from_atoms(atoms, config.type_map)
    positions, box = positions.astype(jnp.float32), box.astype(jnp.float32)
    print(f"{n:,} Cu atoms, box {atoms.cell.lengths().round(1)} A, model {calc.num_params:,} parameters, "
          f"cutoff {config.rcut} A + skin {args.skin} A")

    neighbor_fn = djm.neighbor_list(box, config.rcut, dr_threshold=args.skin)
    t = time.perf_counter()
    nbrs = neighbor_fn.allocate(positions)
    allocate_s = time.perf_counter() - t
    edges = int(jnp.sum(nbrs.idx[0] < n))
    rebuild = jax.jit(neighbor_fn.update).lower(positions, nbrs).compile().memory_analysis()
    radius = config.rcut + args.skin
    images = tuple(int(k) for k in djm._image_range(box, radius))
    multi_image = djm._search.lower(jax.ShapeDtypeStruct(positions.shape, positions.dtype), box, images=images,
                                    radius=radius, fractional=True, capacity=nbrs.max_occupancy)
    multi_image = multi_image.compile().memory_analysis()
    neighbors = {"search": "cell_list" if nbrs.cells is not None else "multi_image", "cells": nbrs.cells,
                 "cell_capacity": nbrs.cell_capacity, "edges": edges, "capacity": nbrs.max_occupancy,
                 "candidates_per_atom": math.prod(2 * k + 1 for k in nbrs.images) * nbrs.cell_capacity,
                 "allocate_s": allocate_s, "list_mb": nbytes((nbrs.idx, nbrs.shifts, nbrs.reference_position)) / 1e6,
                 "rebuild_scratch_mb": rebuild.temp_size_in_bytes / 1e6,
                 "multi_image_scratch_mb_planned": multi_image.temp_size_in_bytes / 1e6}
    print(f"neighbour list: {neighbors}")

    energy = djm.energy_fn(calc, species, box)
    _, shift = space.periodic_general(box)
    init, apply = simulate.nve(energy, shift, args.dt_fs * units.fs)
    masses = jnp.asarray(atoms.get_masses(), jnp.float32)
    state = jax.jit(init)(jax.random.key(0), positions, args.temperature * units.kB, mass=masses, neighbor=nbrs)

    @jax.jit
    def energies(state, nbrs):  # potential, kinetic (eV)
        return energy(state.position, nbrs), quantity.kinetic_energy(momentum=state.momentum, mass=state.mass)

    e_start = [float(e) for e in energies(state, nbrs)]
    chunks, times = [], []
    for done in range(0, args.steps, args.chunk):
        t = time.perf_counter()
        state, nbrs = djm.run(apply, state, neighbor_fn, nbrs, min(args.chunk, args.steps - done), chunk=args.chunk)
        jax.block_until_ready(state.position)
        times.append(time.perf_counter() - t)
        temperature = float(quantity.temperature(momentum=state.momentum, mass=state.mass) / units.kB)
        chunks.append({"steps": done + args.chunk, "seconds": times[-1], "temperature_K": temperature,
                       "capacity": nbrs.max_occupancy})
        print(f"  step {done + args.chunk:4d}: {times[-1]:6.1f} s  T {temperature:6.1f} K")
    e_end = [float(e) for e in energies(state, nbrs)]
    steps_timed = args.steps - args.chunk
    result = {"atoms": n, "steps": args.steps, "dt_fs": args.dt_fs,
              "first_chunk_s": times[0], "steps_per_s": steps_timed / sum(times[1:]) if steps_timed else None,
              "peak_rss_mb": peak_rss_mb(), "neighbors": neighbors,
              "potential_kinetic_ev_start": e_start, "potential_kinetic_ev_end": e_end,
              "total_energy_change_over_kinetic": (sum(e_end) - sum(e_start)) / e_start[1], "chunks": chunks}
    info = header(host, threads=args.threads, model={**MODEL, "parameters": calc.num_params, "dtype": "float32"},
                  result=result)
    info["versions"]["jax-md"] = importlib.metadata.version("jax-md")
    print(json.dumps(result, indent=1))
    write_json(info, args.output)


if __name__ == "__main__":
    main()
