"""Inference speed of DPA4-Air in dpa4-jax, and of the reference (DeePMD-kit 3.2.0, PyTorch) when installed.

What is timed: energy + forces + stress of periodic cubic supercells (fcc Cu, a = 3.61 A;
bcc Fe, a = 2.87 A; rocksalt NaCl, a = 5.64 A; Gaussian rattle 0.05 A) through ASE
calculators, end to end as a user sees it (the paper's Fig. 3 protocol: neighbour list,
padding, host <-> device copies included, after warm-up):

    atoms.calc = calc
    atoms.get_potential_energy(); atoms.get_forces(); atoms.get_stress()

* dpa4-jax: ``DPA4Calculator.from_config("configs/air_mptrj.yaml", seed=0, dtype="float32")``
  (2.76M parameters). A fresh random model gives zero forces because every residual
  output projection starts at zero, so those weights get 0.1 * N(0, 1): the timing
  does not depend on the values, but this keeps the work representative.
* reference: the same hyper-parameters built with DeePMD-kit's PyTorch backend, its
  zero weights filled the same way, through its ASE calculator ``deepmd.calculator.DP``
  (see ``reference.py`` for how to install it next to dpa4-jax). Skipped when
  deepmd-kit's PyTorch backend is not importable.

Per size: the first call on a fresh calculator (for dpa4-jax: tracing + XLA
compilation + one run), one warm-up call, then ``--repeats`` timed calls, each on a
freshly rattled copy (so ASE caches nothing). Both implementations see the same
structures, interleaved call by call, so that their ratio is measured under the
same machine load. "cpu/wall" is process CPU time over wall time during the timed
calls: the number of cores each implementation actually kept busy.

The floor (not in ``--sweep``: it costs one more compilation per size): dpa4-jax's E+F+V on the padded
graph is compiled once more to count the FLOPs of its matrix products (the ``dot`` instructions of the
optimized HLO), which divided by the matmul peak measured in the same run (a 2048^2 float32 matmul, before
and after the sizes, the larger kept) give the time no implementation of this algorithm beats on this
machine; the reference's time over that floor is the most any implementation could gain on it.

Both run with the same thread count (``--threads``, default 1): the process is
pinned to that many cores (``os.sched_setaffinity``; XLA sizes its CPU thread pool
from the affinity), XLA gets ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`` for
1 thread, and PyTorch ``torch.set_num_threads``
(through DeePMD-kit's ``DP_INTRA_OP_PARALLELISM_THREADS`` and ``OMP_NUM_THREADS``),
all set before either library is imported.

Run from the repository root (a venv with dpa4-jax, plus the reference for the ratio):

    python benchmarks/inference.py                      # fcc Cu, 32, 108, 256 atoms, 5 repeats
    python benchmarks/inference.py --sizes 32 108 --repeats 3 --threads 2
    python benchmarks/inference.py --same-weights       # dpa4-jax loads the reference's weights; prints max |diff|
    python benchmarks/inference.py --sweep --threads 2  # fcc, bcc, rocksalt from 8 to ~2,000 atoms, with a plot

Writes ``benchmarks/results/inference.json`` (``--output``; ``--sweep``: ``inference_sweep.json``)
and, for ``--sweep``, a PNG of atoms/s against size next to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LATTICES = {  # name -> (ase.build.bulk arguments, atoms in the cubic cell)
    "fcc": (dict(name="Cu", crystalstructure="fcc", a=3.61), 4),
    "bcc": (dict(name="Fe", crystalstructure="bcc", a=2.87), 2),
    "rocksalt": (dict(name="NaCl", crystalstructure="rocksalt", a=5.64), 8),
}
SWEEP = {"fcc": [32, 108, 256, 500, 864, 2048], "bcc": [16, 128, 432, 1024, 2000],
         "rocksalt": [8, 64, 216, 512, 1000, 1728]}  # atoms: (atoms in the cubic cell) * repeat^3
RATTLE = 0.05


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 108, 256],
                   help="numbers of atoms of the cubic supercells (4 r^3 fcc, 2 r^3 bcc, 8 r^3 rocksalt)")
    p.add_argument("--lattices", nargs="+", default=["fcc"], choices=sorted(LATTICES))
    p.add_argument("--sweep", action="store_true",
                   help=f"every lattice at the sizes {SWEEP} (overrides --sizes, --lattices) and a plot")
    p.add_argument("--reference-max-atoms", type=int, default=None,
                   help="time the reference only up to this size (it is the slow side)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per size, after one warm-up call")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both implementations")
    p.add_argument("--config", default=str(ROOT / "configs" / "air_mptrj.yaml"), help="model section of this YAML")
    p.add_argument("--no-reference", action="store_true", help="time dpa4-jax only")
    p.add_argument("--same-weights", action="store_true",
                   help="dpa4-jax uses the reference's weights (DPA4Calculator.from_deepmd) and results are compared")
    p.add_argument("--output", default=None, help="JSON path (default results/inference[_sweep].json)")
    args = p.parse_args()
    if args.output is None:
        args.output = str(HERE / "results" / ("inference_sweep.json" if args.sweep else "inference.json"))
    return args


def set_threads(n: int) -> dict:
    """Thread settings for XLA and PyTorch; must run before jax, torch or deepmd are imported.

    The process is pinned to ``n`` cores: XLA's CPU client sizes its worker pool from
    the CPU affinity (with ``--xla_cpu_multi_thread_eigen=false`` alone it still kept
    two worker threads busy on a 2-core machine).
    """
    usable = sorted(os.sched_getaffinity(0))
    if n < len(usable):
        os.sched_setaffinity(0, usable[:n])
    if n == 1:  # XLA has no thread-count flag: its pool follows the affinity; this keeps each op serial
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    os.environ["JAX_PLATFORMS"] = os.environ.get("JAX_PLATFORMS", "cpu")
    sys.path[:0] = [str(HERE), str(ROOT)]  # reference.py; dpa4_jax when not installed
    import reference

    reference.set_threads(n)
    return {"threads": n, "cpu_affinity": sorted(os.sched_getaffinity(0)), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version()}


def structures(n_atoms: int, count: int, lattice: str = "fcc") -> list:
    """``count`` rattled copies of the ``n_atoms`` cubic supercell of ``lattice`` (seeded, reproducible)."""
    from ase.build import bulk

    kwargs, per_cell = LATTICES[lattice]
    repeat = round((n_atoms / per_cell) ** (1 / 3))
    if per_cell * repeat**3 != n_atoms:
        raise ValueError(f"{n_atoms} atoms is no cubic {lattice} supercell ({per_cell} r^3 atoms)")
    base = bulk(**kwargs, cubic=True).repeat(repeat)
    out = []
    for i in range(count):
        atoms = base.copy()
        atoms.rattle(RATTLE, seed=1000 * n_atoms + i)
        out.append(atoms)
    return out


def evaluate(calc, atoms) -> tuple[float, float, tuple]:
    """Wall and CPU seconds of E + F + stress on a fresh copy of ``atoms``, and the results."""
    atoms = atoms.copy()
    atoms.calc = calc
    wall, cpu = time.perf_counter(), time.process_time()
    e = atoms.get_potential_energy()
    f = atoms.get_forces()
    s = atoms.get_stress()
    return time.perf_counter() - wall, time.process_time() - cpu, (e, f, s)


def fill_zero_weights(params, std: float = 0.1, seed: int = 0):
    """Every all-zero parameter (the residual output projections, norm biases) gets ``std * N(0, 1)``."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def fill(x):
        x = np.asarray(x)
        return (std * rng.standard_normal(x.shape)).astype(x.dtype) if not np.any(x) else x

    return jax.tree.map(fill, params)


def summary(walls: list[float], cpus: list[float], n_atoms: int) -> dict:
    med = statistics.median(walls)
    return {"median_s": med, "min_s": min(walls), "atoms_per_s": n_atoms / med,
            "cpu_over_wall": sum(cpus) / sum(walls), "runs_s": walls}


def main():
    args = parse_args()
    host = machine()  # before pinning
    threads = set_threads(args.threads)
    logging.getLogger("torch._library").setLevel(logging.ERROR)  # "Triton not available" on CPU wheels

    import flax
    import jax
    import jaxlib
    import numpy as np

    import reference
    import roofline
    from dpa4_jax import DPA4Calculator

    skipped = "--no-reference" if args.no_reference else reference.unavailable()
    ref = None
    versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                "flax": flax.__version__, "numpy": np.__version__}
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": host, "jax_devices": [str(d) for d in jax.devices()],
            "load_average_start": os.getloadavg()}

    calc0 = DPA4Calculator.from_config(args.config, seed=0, dtype="float32")
    config = calc0.config
    variables = dict(calc0.variables, params=fill_zero_weights(calc0.params))
    if skipped is None:
        ref = reference.Reference(config)
        versions.update(reference.versions())
        threads.update(reference.thread_info())
        if args.same_weights:
            calc_ref_weights = DPA4Calculator.from_deepmd(ref.serialized()["atomic_model"], dtype="float32")
            variables = calc_ref_weights.variables
    elif args.same_weights:
        sys.exit("--same-weights needs the reference: " + skipped)
    info.update(versions=versions, threads=threads, model={
        "config": args.config, "parameters": calc0.num_params, "dtype": "float32",
        "reference_parameters": ref.num_params if ref else None,
        "weights": "reference's (--same-weights)" if args.same_weights else "from_config(seed=0), zero weights filled"},
        repeats=args.repeats, reference_skipped=skipped)
    print(f"dpa4-jax {calc0.num_params:,} parameters, float32; jax {jax.__version__} on {info['jax_devices']}; "
          f"{info['machine']['cpu']} x{info['machine']['cpu_count']}; threads {args.threads}")
    print(f"reference: {'DeePMD-kit ' + versions['deepmd-kit'] + ', torch ' + versions['torch'] if ref else 'skipped (' + skipped + ')'}")

    cases = ([(lattice, n) for lattice, sizes in SWEEP.items() for n in sizes] if args.sweep
             else [(lattice, n) for lattice in args.lattices for n in args.sizes])
    peaks = [] if args.sweep else [roofline.matmul_peak(jax.numpy.float32, args.repeats)]  # before and after
    for lattice, n in cases:
        structures(n, 0, lattice)  # a size that is no supercell stops here, before any timing
    results = []
    for lattice, n in cases:
        frames = structures(n, args.repeats + 2, lattice)
        impls = {"dpa4-jax": DPA4Calculator(config, variables, dtype="float32")}
        if ref is not None and n <= (args.reference_max_atoms or n):
            impls["reference"] = ref.calculator()
        row = {"lattice": lattice, "formula": frames[0].get_chemical_formula(), "atoms": n, "edges": None}
        walls = {k: [] for k in impls}
        cpus = {k: [] for k in impls}
        diffs = []
        for i, atoms in enumerate(frames):  # 0: first call, 1: warm-up, then timed
            out = {}
            for name, calc in impls.items():
                wall, cpu, out[name] = evaluate(calc, atoms)
                if i == 0:
                    row[name] = {"first_call_s": wall}
                elif i >= 2:
                    walls[name].append(wall)
                    cpus[name].append(cpu)
            if args.same_weights:
                (ej, fj, sj), (er, fr, sr) = out["dpa4-jax"], out["reference"]
                diffs.append((abs(ej - er), reference.max_abs_diff(fj, fr), reference.max_abs_diff(sj, sr)))
        jc = impls["dpa4-jax"]
        row["edges"] = int(jc.graph(frames[-1]).n_edge[0])
        row["dpa4-jax"].update(summary(walls["dpa4-jax"], cpus["dpa4-jax"], n), compilations=jc.compilations,
                               padded_nodes=jc._budget.n_node, padded_edges=jc._budget.n_edge)
        # The first call is trace + compile + one evaluation; this estimates the compilation alone.
        row["dpa4-jax"]["compile_estimate_s"] = row["dpa4-jax"]["first_call_s"] - row["dpa4-jax"]["median_s"]
        if "reference" in impls:
            row["reference"].update(summary(walls["reference"], cpus["reference"], n))
            row["speedup_median"] = row["reference"]["median_s"] / row["dpa4-jax"]["median_s"]
            row["speedup_min"] = row["reference"]["min_s"] / row["dpa4-jax"]["min_s"]
        if peaks:  # not in the sweep: one more compilation per size
            efv = roofline.model_functions(jc.config, jc.variables)[1]
            row["dpa4-jax"]["matmul_flops"] = roofline.costs(efv, jc.variables, jc.graph(frames[-1]))[0]["matmul_flops"]
        if diffs:
            row["max_abs_diff"] = {"energy_eV": max(d[0] for d in diffs), "forces_eV_per_A": max(d[1] for d in diffs),
                                   "stress_eV_per_A3": max(d[2] for d in diffs)}
        results.append(row)
        print_row(row)

    if peaks:
        peaks.append(roofline.matmul_peak(jax.numpy.float32, args.repeats))
        info["matmul_peak"] = max(peaks, key=lambda p: p["gflops"])  # the machine's load changes during the run
        for row in results:
            roofline.matmul_floor(row["dpa4-jax"], info["matmul_peak"])
            if "reference" in row:
                row["reference_over_floor"] = row["reference"]["median_s"] / row["dpa4-jax"]["matmul_floor_s"]
    info["load_average_end"] = os.getloadavg()
    info["results"] = results
    print_table(results, ref is not None)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out}")
    if args.sweep:
        print(f"wrote {plot(info, out.with_suffix('.png'))}")
    if ref is not None:
        ref.close()


def print_row(row):
    j = row["dpa4-jax"]
    msg = (f"  {row['formula']}, {row['edges']} edges (padded to {j['padded_edges']}): "
           f"dpa4-jax first call {j['first_call_s']:.1f} s, "
           f"median {j['median_s']:.3f} s (cpu/wall {j['cpu_over_wall']:.2f}, compilations {j['compilations']})")
    if "reference" in row:
        r = row["reference"]
        msg += f"; reference median {r['median_s']:.3f} s (cpu/wall {r['cpu_over_wall']:.2f})"
    if "max_abs_diff" in row:
        d = row["max_abs_diff"]
        msg += f"; max |dE| {d['energy_eV']:.2e} eV, |dF| {d['forces_eV_per_A']:.2e} eV/A, |ds| {d['stress_eV_per_A3']:.2e}"
    print(msg, flush=True)


def print_table(results, with_reference):
    head = f"{'lattice':>8} {'atoms':>5} {'edges':>6} | {'jax 1st call':>12} {'median':>8} {'min':>8} {'atoms/s':>8}"
    floor = "matmul_floor_s" in results[0]["dpa4-jax"]
    if floor:
        head += f" {'floor':>6}"
    if with_reference:
        head += f" | {'ref median':>10} {'min':>8} {'atoms/s':>8} | {'ref/jax':>7}" + (f" {'ref/floor':>9}" if floor else "")
    print("\nE + F + stress, seconds per structure (median and min of the timed calls)")
    print(head)
    print("-" * len(head))
    for r in results:
        j = r["dpa4-jax"]
        line = (f"{r['lattice']:>8} {r['atoms']:5d} {r['edges']:6d} | {j['first_call_s']:12.1f} {j['median_s']:8.3f} {j['min_s']:8.3f} "
                f"{j['atoms_per_s']:8.0f}")
        if floor:
            line += f" {j['matmul_floor_s']:6.3f}"
        if "reference" in r:
            f = r["reference"]
            line += f" | {f['median_s']:10.3f} {f['min_s']:8.3f} {f['atoms_per_s']:8.1f} | {r['speedup_median']:6.2f}x"
            line += f" {r['reference_over_floor']:8.2f}x" if floor else ""
        print(line)
    print("jax 1st call = trace + XLA compilation + one evaluation" + ("; ref/jax = ratio of the medians" if with_reference else ""))
    if floor:
        print("floor = dpa4-jax's matrix-product FLOPs (E+F+V, padded graph) at the run's measured matmul peak: no "
              "implementation of this algorithm is faster here" + ("; ref/floor = the most any could gain on the "
                                                                   "reference" if with_reference else ""))


def plot(info: dict, path: Path) -> Path:
    """Atoms per second against size, one line per lattice and implementation (the paper's Fig. 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for color, lattice in zip(("C0", "C1", "C2"), LATTICES):
        rows = [r for r in info["results"] if r["lattice"] == lattice]
        for impl, style in (("dpa4-jax", "-o"), ("reference", "--s")):
            points = [(r["atoms"], r[impl]["atoms_per_s"]) for r in rows if impl in r]
            if points:
                ax.plot(*zip(*points), style, color=color, label=f"{impl}, {lattice} {LATTICES[lattice][0]['name']}")
    ax.set(xscale="log", xlabel="atoms", ylabel="atoms / s (E + F + stress, float32)",
           title=f"DPA4-Air inference, {info['machine']['cpu']}, {info['threads']['threads']} thread(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    main()
