"""Batched relaxation (``dpa4_jax.relax.relax``) against the ASE loop with the same model: speed, agreement, memory.

What runs: ``--structures`` MPtrj-like crystals (8-100 atoms, log-uniform; fcc cells of mixed Al/Ni/Cu/Au with
vacancies, strained by up to ~4 % and rattled by 0.05-0.1 A, seeded), relaxed with FIRE on a FrechetCellFilter
(``fmax`` 0.05 eV/A, at most ``--max-steps`` steps, the Matbench Discovery protocol) two ways, each in a process
of its own (own timings and peak memory):

- ``batched``: ``relax(calc, structures)``, one compiled step for a padded batch of ``--batch-atoms`` atoms;
- ``ase``: ``FIRE(FrechetCellFilter(atoms)).run(fmax, steps)`` per structure with ``DPA4Calculator``, on the first
  ``--ase-structures`` of them (the loop is slow; the batched run is also timed on that subset alone).

The model: ``--model`` (a train.py run, e.g. ``python train.py --config configs/demo.yaml``) or, without one, the
demo config's architecture with random weights (its zero-initialised projections filled with 0.05 N(0, 1)).

Reported: structures/s (wall) and process CPU time of each, FIRE steps, compilations, peak resident memory (the
batched run at two set sizes: memory follows the batch, not the number of structures), and the agreement per
structure: equal step counts, energy differences per atom, convergence.

    python train.py --config configs/demo.yaml --workdir runs/demo --set training.steps=400   # the model (~12 min)
    python benchmarks/relax.py --model runs/demo --structures 200 --ase-structures 30
    taskset -c 0,1 python benchmarks/relax.py ...          # pinned, as the README's numbers

Writes ``benchmarks/results/relax.json`` and ``relax.png`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine, write_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ELEMENTS = {"Al": 4.05, "Ni": 3.52, "Cu": 3.61, "Au": 4.08}  # fcc lattice constants (A): Vegard mix per structure


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="train.py run directory (default: the demo architecture, random)")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="architecture without --model")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--structures", type=int, default=200)
    p.add_argument("--ase-structures", type=int, default=30, help="the first N also go through the ASE loop")
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--batch-atoms", type=int, default=None)
    p.add_argument("--skin", type=float, default=None, help="default: relax's (0.1 A on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(HERE / "results" / "relax.json"))
    p.add_argument("--worker", choices=("batched", "ase"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))


def mptrj_like(count: int, seed: int) -> list:
    """``count`` crystals of 8-100 atoms (log-uniform): fcc supercells, 1-3 elements, vacancies, strain, rattle."""
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    symbols = list(ELEMENTS)
    out = []
    while len(out) < count:
        target = int(round(np.exp(rng.uniform(np.log(8), np.log(100)))))
        cubic = rng.random() < 0.5
        per_cell = 4 if cubic else 1
        cells = max(1, round(target / per_cell))
        reps = sorted(_factor3(cells, rng), reverse=True)
        chosen = rng.choice(symbols, size=rng.integers(1, 4), replace=False)
        fractions = rng.dirichlet(np.ones(len(chosen)))
        a = sum(f * ELEMENTS[s] for f, s in zip(fractions, chosen)) * rng.uniform(0.98, 1.03)
        atoms = bulk("Cu", "fcc", a=a, cubic=cubic).repeat(reps)
        atoms.symbols = rng.choice(chosen, size=len(atoms), p=fractions)
        for _ in range(rng.integers(0, 3) if len(atoms) > 10 else 0):
            del atoms[int(rng.integers(len(atoms)))]
        if not 8 <= len(atoms) <= 100:
            continue
        strain = np.eye(3) + 0.02 * rng.standard_normal((3, 3))
        atoms.set_cell(atoms.cell.array @ (0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.rattle(rng.uniform(0.05, 0.1), seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out


def _factor3(n: int, rng) -> tuple[int, int, int]:
    """Three repeats whose product is ``n``, as even as the factors allow."""
    reps = [1, 1, 1]
    for p in _prime_factors(n)[::-1]:
        reps[int(np.argmin(reps))] *= p
    return tuple(int(r) for r in rng.permutation(reps))


def _prime_factors(n: int) -> list[int]:
    out, d = [], 2
    while d * d <= n:
        while n % d == 0:
            out.append(d)
            n //= d
        d += 1
    return out + ([n] if n > 1 else [])


def load_calculator(args):
    import jax

    from dpa4_jax.calculator import DPA4Calculator

    if args.model:
        return DPA4Calculator.from_checkpoint(args.model, dtype=args.dtype)
    calc = DPA4Calculator.from_config(args.config, seed=args.seed, dtype=args.dtype)
    keys = jax.random.split(jax.random.key(args.seed), len(jax.tree.leaves(calc.params)))
    leaves, tree = jax.tree.flatten(calc.params)
    calc.params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                            for k, x in zip(keys, leaves)])
    return calc


# ------------------------------------------------------------------------------------------------ workers
def worker(args) -> None:
    """One way of relaxing, in this process: writes per-structure results, timings and memory to ``--result``."""
    sys.path.insert(0, str(ROOT))
    import jax

    calc = load_calculator(args)
    structures = mptrj_like(args.structures, args.seed)[: args.count]
    wall, cpu = time.perf_counter(), time.process_time()
    if args.worker == "batched":
        from dpa4_jax.relax import relax

        out = relax(calc, structures, args.fmax, args.max_steps, skin=args.skin, batch_atoms=args.batch_atoms,
                    progress=False)
        extra = {"compilations": out.compilations, "iterations": out.iterations, "rebuilds": out.rebuilds}
        results = [(a.get_potential_energy(), a.info["steps"], a.info["converged"], a.get_volume()) for a in out]
    else:
        from ase.filters import FrechetCellFilter
        from ase.optimize import FIRE

        results = []
        for atoms in structures:
            atoms.calc = calc
            opt = FIRE(FrechetCellFilter(atoms), logfile=None)
            converged = opt.run(fmax=args.fmax, steps=args.max_steps)
            results.append((atoms.get_potential_energy(), opt.nsteps, bool(converged), atoms.get_volume()))
        extra = {"compilations": calc.compilations}
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    energy, steps, converged, volume = map(list, zip(*results))
    Path(args.result).write_text(json.dumps({
        "structures": len(structures), "atoms": [len(a) for a in structures], "wall_s": wall, "cpu_s": cpu,
        "structures_per_s": len(structures) / wall, "peak_rss_mb": peak_rss_mb(), "energy": energy, "steps": steps,
        "converged": converged, "volume": volume, "backend": jax.default_backend(), **extra}))


def run_worker(args, mode: str, count: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        argv = [sys.executable, __file__, "--worker", mode, "--count", str(count), "--result", tmp.name,
                "--structures", str(args.structures), "--fmax", str(args.fmax), "--max-steps", str(args.max_steps),
                "--seed", str(args.seed), "--dtype", args.dtype, "--config", args.config]
        argv += ["--skin", str(args.skin)] if args.skin is not None else []
        argv += ["--model", args.model] if args.model else []
        argv += ["--batch-atoms", str(args.batch_atoms)] if args.batch_atoms else []
        print(f"{mode}: {count} structures ...", flush=True)
        subprocess.run(argv, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        result = json.loads(Path(tmp.name).read_text())
    print(f"  {result['structures_per_s']:.3f} structures/s, wall {result['wall_s']:.0f} s, cpu {result['cpu_s']:.0f} s, "
          f"{sum(result['steps'])} steps, {result['compilations']} compilations, peak {result['peak_rss_mb']:.0f} MB",
          flush=True)
    return result


def agreement(batched: dict, ase: dict) -> dict:
    n = ase["structures"]
    atoms = np.array(ase["atoms"])
    de = np.abs(np.array(batched["energy"][:n]) - np.array(ase["energy"])) / atoms
    same_steps = np.array(batched["steps"][:n]) == np.array(ase["steps"])
    return {"structures": n, "same_steps": int(same_steps.sum()),
            "energy_diff_per_atom_max": float(de.max()), "energy_diff_per_atom_median": float(np.median(de)),
            "converged_batched": int(sum(batched["converged"][:n])), "converged_ase": int(sum(ase["converged"]))}


def plot(info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = info["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [f"ASE loop\n({runs['ase']['structures']})", f"batched\n({runs['batched_subset']['structures']})",
             f"batched\n({runs['batched']['structures']})"]
    rates = [runs[k]["structures_per_s"] for k in ("ase", "batched_subset", "batched")]
    left.bar(names, rates, color=["0.6", "C0", "C0"])
    left.set_ylabel("structures / s (wall)")
    left.set_title(f"FIRE + FrechetCellFilter, fmax {info['settings']['fmax']}", fontsize=10)
    n = runs["ase"]["structures"]
    de = np.abs(np.array(runs["batched_subset"]["energy"]) - np.array(runs["ase"]["energy"])) / np.array(
        runs["ase"]["atoms"])
    right.scatter(runs["ase"]["steps"], runs["batched_subset"]["steps"], c=np.log10(np.maximum(de, 1e-12)), s=12)
    lim = max(max(runs["ase"]["steps"]), 1)
    right.plot([0, lim], [0, lim], "k:", lw=0.8)
    right.set_xlabel("FIRE steps, ASE loop")
    right.set_ylabel("FIRE steps, batched")
    right.set_title(f"{n} structures; colour: log10 |dE| per atom (eV)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    load_start = os.getloadavg()
    subset = min(args.ase_structures, args.structures)
    runs = {"batched": run_worker(args, "batched", args.structures),
            "batched_subset": run_worker(args, "batched", subset),
            "ase": run_worker(args, "ase", subset)}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    info = {"benchmark": "relax", "machine": machine(), "load_average_start": load_start,
            "load_average_end": os.getloadavg(), "children_cpu_s": children.ru_utime + children.ru_stime,
            "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "count", "result")},
            "runs": runs, "agreement": agreement(runs["batched_subset"], runs["ase"]),
            "speedup_same_structures": runs["batched_subset"]["structures_per_s"] / runs["ase"]["structures_per_s"],
            "speedup_full_set": runs["batched"]["structures_per_s"] / runs["ase"]["structures_per_s"]}
    print(json.dumps({k: info[k] for k in ("agreement", "speedup_same_structures", "speedup_full_set")}, indent=1))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(info, out)
    plot(info, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
