"""Soak test of the ASE calculator: many calls on structures of random size, memory and compilations over time.

What runs: ``--calls`` (10,000) energy + forces (+ stress when periodic) evaluations through
``DPA4Calculator`` (a tiny random float32 model, ``MODEL``) on a fresh
structure each call, 8 to 500 atoms drawn uniformly (a gas overshoots by up to one molecule): rattled and strained fcc Cu / Au,
bcc Cu, diamond Si supercells with random vacancies, and gases of small H/C/O molecules
(periodic or free). The process's resident memory (RSS, /proc/self/status) is sampled
every ``--every`` calls with the calculator's compilation count.

A leak shows as RSS that keeps climbing once the padded budget (and so the set of
compiled programs) has stopped growing; the summary gives the RSS slope over the
calls after the last compilation.

    python benchmarks/soak.py                   # 10,000 calls
    python benchmarks/soak.py --calls 500       # a short run
    python benchmarks/soak.py --max-minutes 30  # as many calls as fit in 30 minutes (at most --calls)

Writes ``benchmarks/results/soak.json`` (``--output``) and a PNG of RSS and compilations
against calls next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from common import RESULTS, fill_zero_weights, header, machine, pyplot, save_figure, set_threads

TYPE_MAP = ("H", "C", "O", "Si", "Cu", "Au")
# Smaller than tests/conftest.py's TINY (one block, L = 1, 8 channels) so that 10,000 calls fit in ~20 minutes on
# 2 shared cores; every calculator path (neighbour list, padding, budget growth, jit, stress) is the same.
MODEL = dict(type_map=TYPE_MAP, channels=8, lmax=1, mmax=1, n_blocks=1, mixing_layers=1, n_radial=4, rcut=4.0,
             n_focus=1, radial_so2_rank=1)
CRYSTALS = {  # name -> ase.build.bulk arguments (cubic cells)
    "fcc Cu": dict(name="Cu", crystalstructure="fcc", a=3.61),
    "fcc Au": dict(name="Au", crystalstructure="fcc", a=4.08),
    "bcc Cu": dict(name="Cu", crystalstructure="bcc", a=2.87),
    "diamond Si": dict(name="Si", crystalstructure="diamond", a=5.43),
}
MOLECULES = ("CH4", "H2O", "CH3OH", "C6H6", "CO2", "C2H6", "HCOOH", "CH3CHO")
MOLECULE_SPACING = 6.0  # A between molecular centres: wider than two benzenes, so molecules never overlap


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--every", type=int, default=100, help="RSS sample interval (calls)")
    p.add_argument("--min-atoms", type=int, default=8)
    p.add_argument("--max-atoms", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this wall time (the results say how many calls ran)")
    p.add_argument("--threads", type=int, default=2, help="CPU cores the process is pinned to")
    p.add_argument("--output", default=str(RESULTS / "soak.json"))
    return p.parse_args()


def rss_mb() -> tuple[float, float]:
    """Resident and peak resident memory of this process (MB)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def crystal(rng, n_atoms: int):
    """A supercell of a random crystal with ``n_atoms`` atoms (random vacancies), strained and rattled."""
    from ase.build import bulk

    name = rng.choice(list(CRYSTALS))
    unit = bulk(**CRYSTALS[name], cubic=True)
    repeats = [1, 1, 1]
    while len(unit) * repeats[0] * repeats[1] * repeats[2] < n_atoms:
        repeats[int(rng.integers(3))] += 1
    atoms = unit * repeats
    del atoms[rng.choice(len(atoms), len(atoms) - n_atoms, replace=False).tolist()]
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + rng.uniform(-0.03, 0.03, (3, 3))), scale_atoms=True)
    atoms.rattle(float(rng.uniform(0.02, 0.15)), seed=int(rng.integers(2**31)))
    return name, atoms


def gas(rng, n_atoms: int):
    """Randomly oriented H/C/O molecules on a jittered grid until at least ``n_atoms``; periodic or free."""
    from ase import Atoms
    from ase.build import molecule

    molecules = []
    while sum(len(m) for m in molecules) < n_atoms:
        molecules.append(molecule(str(rng.choice(MOLECULES))))
    side = int(np.ceil(len(molecules) ** (1 / 3)))
    sites = np.array(np.unravel_index(rng.permutation(side**3)[:len(molecules)], (side,) * 3)).T
    atoms = Atoms(cell=np.eye(3) * side * MOLECULE_SPACING, pbc=bool(rng.integers(2)))
    for m, site in zip(molecules, sites):
        m.rotate(float(rng.uniform(0, 360)), rng.normal(size=3))
        m.translate((site + 0.5) * MOLECULE_SPACING + rng.uniform(-0.5, 0.5, 3))
        atoms += m
    return "molecules " + ("periodic" if atoms.pbc.all() else "free"), atoms


def structure(rng, min_atoms: int, max_atoms: int):
    """``(kind, atoms)``: a crystal or a molecular gas of a uniformly random size in ``[min_atoms, max_atoms]``."""
    n_atoms = int(rng.integers(min_atoms, max_atoms + 1))
    return crystal(rng, n_atoms) if rng.random() < 0.7 else gas(rng, n_atoms)


def evaluate(calc, atoms):
    atoms.calc = calc
    atoms.get_potential_energy()
    atoms.get_forces()
    if atoms.pbc.all():
        atoms.get_stress()


def main():
    args = parse_args()
    host = machine()  # before pinning
    set_threads(args.threads)
    from tqdm import tqdm

    from dpa4_jax.calculator import DPA4Calculator
    from dpa4_jax.config import ModelConfig

    config = ModelConfig(**MODEL)
    fresh = DPA4Calculator.from_config(config, seed=0, dtype="float32")
    calc = DPA4Calculator(config, dict(fresh.variables, params=fill_zero_weights(fresh.params)), dtype="float32")
    rng = np.random.default_rng(args.seed)
    info = header(host, threads=args.threads, model={**MODEL, "parameters": calc.num_params, "dtype": "float32"},
                  calls=args.calls, atoms_range=[args.min_atoms, args.max_atoms], seed=args.seed)
    rss_start, _ = rss_mb()
    samples = []  # (calls done, RSS MB, peak RSS MB, compilations, seconds)
    kinds, sizes = {}, []
    start = time.perf_counter()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    for call in tqdm(range(1, args.calls + 1), desc="soak", mininterval=10):
        kind, atoms = structure(rng, args.min_atoms, args.max_atoms)
        kinds[kind] = kinds.get(kind, 0) + 1
        sizes.append(len(atoms))
        evaluate(calc, atoms)
        out_of_time = args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes
        if call % args.every == 0 or call in (1, args.calls) or out_of_time:
            samples.append((call, *rss_mb(), calc.compilations, time.perf_counter() - start))
            # Written at every sample, so that a run stopped early leaves its results.
            info.update(load_average_end=os.getloadavg(), calls_done=call, structures=kinds, atoms_min=min(sizes),
                        atoms_max=max(sizes), atoms_mean=float(np.mean(sizes)), seconds=time.perf_counter() - start,
                        padded_budget={"nodes": calc._budget.n_node, "edges": calc._budget.n_edge},
                        samples=[dict(zip(("calls", "rss_mb", "peak_rss_mb", "compilations", "seconds"), s))
                                 for s in samples], summary=summary(rss_start, samples))
            out.write_text(json.dumps(info, indent=1) + "\n")
        if out_of_time:
            break
    print(json.dumps(info["summary"], indent=1))
    print(f"wrote {out} and {plot(info, out.with_suffix('.png'))}")


def summary(rss_start: float, samples: list) -> dict:
    """RSS at start, after the last compilation and at the end, and the RSS slope after the last compilation."""
    calls, rss, peak, compilations, seconds = map(np.array, zip(*samples))
    settled = np.flatnonzero(compilations == compilations[-1])[0]  # first sample with the final program set
    tail = slice(settled, None)
    slope = np.polyfit(calls[tail], rss[tail], 1)[0] * 1000 if len(calls[tail]) > 2 else float("nan")
    return {"rss_start_mb": rss_start, "rss_first_call_mb": float(rss[0]), "rss_settled_mb": float(rss[settled]),
            "settled_at_call": int(calls[settled]), "rss_end_mb": float(rss[-1]), "peak_rss_mb": float(peak[-1]),
            "rss_slope_mb_per_1000_calls_after_settling": float(slope), "compilations": int(compilations[-1]),
            "calls_per_s": float(calls[-1] / seconds[-1])}


def plot(info: dict, path: Path) -> Path | None:
    """RSS and compilations against calls."""
    plt = pyplot()
    if plt is None:
        return None
    calls = [s["calls"] for s in info["samples"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(calls, [s["rss_mb"] for s in info["samples"]], "-", color="C0", label="RSS")
    ax.set(xlabel="calculator calls", ylabel="resident memory (MB)",
           title=f"soak: {info['calls_done']:,} calls, {info['atoms_range'][0]}-{info['atoms_range'][1]} atoms, "
                 f"{info['model']['parameters']:,}-parameter model")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    twin.step(calls, [s["compilations"] for s in info["samples"]], where="post", color="C1", label="compilations")
    twin.set_ylabel("compilations (cumulative)")
    twin.set_ylim(bottom=0)
    fig.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
