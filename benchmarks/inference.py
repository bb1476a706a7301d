"""Inference speed of DPA4-Air in dpa4-jax, and of the reference (DeePMD-kit 3.2.0, PyTorch) when installed.

What is timed: energy + forces + stress of periodic cubic supercells (fcc Cu, a = 3.61 A;
bcc Fe, a = 2.87 A; rocksalt NaCl, a = 5.64 A; Gaussian rattle 0.05 A) through ASE
calculators, end to end as a user sees it (the paper's Fig. 3 protocol: neighbour list,
padding, host <-> device copies included, after warm-up):

    atoms.calc = calc
    atoms.get_potential_energy(); atoms.get_forces(); atoms.get_stress()

* dpa4-jax: ``DPA4Calculator.from_config("configs/air_mptrj.yaml", seed=0, dtype="float32")``
  (2.76M parameters), its zero-initialised weights (a fresh model has zero forces) filled with
  0.1 * N(0, 1) (``common.fill_zero_weights``): the time does not depend on the values, but
  this keeps the work representative.
* reference: the same hyper-parameters built with DeePMD-kit's PyTorch backend, its zero weights
  filled the same way, through its ASE calculator ``deepmd.calculator.DP`` (``reference.py``
  says how to install it; ``--reference-python`` names that venv's interpreter). Skipped when
  deepmd-kit's PyTorch backend does not import there.

The protocol (fair, same run): each implementation runs in a process of its own (``common.Side``),
both pinned to the same cores (``taskset``; ``--threads``, default 1, with XLA's and PyTorch's
thread settings from ``common.set_threads``), and they are asked in turn, one structure each
(A B A B ...), so that both see the same machine load and neither runs with the other's
allocator state in its process (in one process, calls alternating, the reference's leftovers
cost dpa4-jax ~20% here). Both see the same structures. Per size: the first call on a fresh
calculator (for dpa4-jax: tracing + XLA compilation + one run) and one warm-up call, then
``--repeats`` timed calls, each on a freshly rattled copy (so ASE caches nothing). Reported:
medians and ranges of wall and process CPU time, and the ratio of the medians with the range of
the per-round ratios.

The floor (not in ``--sweep``: it costs one more compilation per size): dpa4-jax's E+F+V on the
padded graph is compiled once more to count the FLOPs of its matrix products (the ``dot``
instructions of the optimized HLO), which divided by the matmul peak measured in the same run
(a 2048^2 float32 matmul in the dpa4-jax process, before and after the sizes, the larger kept)
give the time no implementation of this algorithm beats on this machine; the reference's time
over that floor is the most any implementation could gain on it.

Run from the repository root:

    python benchmarks/inference.py --reference-python /work/refvenv/bin/python   # fcc Cu, 32, 108, 256 atoms
    python benchmarks/inference.py --no-reference --sizes 32 108 --repeats 3 --threads 2
    python benchmarks/inference.py --reference-python /work/refvenv/bin/python --same-weights   # max |diff|
    python benchmarks/inference.py --sweep --threads 2 --reference-python /work/refvenv/bin/python

Writes ``benchmarks/results/inference.json`` (``--output``; ``--sweep``: ``inference_sweep.json``)
and, for ``--sweep``, a PNG of atoms/s against size next to it.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import tempfile
from pathlib import Path

from common import (HERE, RESULTS, Side, alternate, best_peak, header, machine, matmul_floor, matmul_peak,
                    print_table, pyplot, save_figure, serve, set_threads, spread, timed_call, write_json)
from workloads import AIR_CONFIG, LATTICES, structures

SWEEP = {"fcc": [32, 108, 256, 500, 864, 2048], "bcc": [16, 128, 432, 1024, 2000],
         "rocksalt": [8, 64, 216, 512, 1000, 1728]}  # atoms: (atoms in the cubic cell) * repeat^3
JAX, REF = "dpa4-jax", "reference"


def parse_args(argv=None):
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
    p.add_argument("--cpus", type=int, nargs="+", default=None,
                   help="cores both sides are pinned to (default: the first --threads usable ones)")
    p.add_argument("--config", default=AIR_CONFIG, help="model section of this YAML")
    p.add_argument("--no-reference", action="store_true", help="time dpa4-jax only")
    p.add_argument("--reference-python", default=sys.executable,
                   help="interpreter of the venv with DeePMD-kit's PyTorch backend (reference.py)")
    p.add_argument("--same-weights", action="store_true",
                   help="dpa4-jax uses the reference's weights (DPA4Calculator.from_deepmd) and results are compared")
    p.add_argument("--output", default=None, help="JSON path (default results/inference[_sweep].json)")
    p.add_argument("--worker", choices=[JAX, REF], help=argparse.SUPPRESS)  # one side, answering common.serve
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)  # the reference's serialized model (pickle)
    args = p.parse_args(argv)
    if args.output is None:
        args.output = str(RESULTS / ("inference_sweep.json" if args.sweep else "inference.json"))
    args.cpus = args.cpus or sorted(os.sched_getaffinity(0))[:args.threads]
    return args


# ------------------------------------------------------------------------------------------ the two sides


def evaluate(calc, atoms) -> dict:
    """Wall and CPU seconds of E + F + stress on a fresh copy of ``atoms``, and the results."""
    atoms = atoms.copy()
    atoms.calc = calc
    results = {}

    def call():
        results.update(energy=atoms.get_potential_energy(), forces=atoms.get_forces().tolist(),
                       stress=atoms.get_stress().tolist())

    return {**timed_call(call), **results}


class Worker:
    """One side's process: a calculator per size, its structures, one E+F+stress per request."""

    def __init__(self, args):
        self.args, self.calc, self.frames = args, None, []
        self.threads = set_threads(args.threads, args.cpus)
        logging.getLogger("torch._library").setLevel(logging.ERROR)  # "Triton not available" on CPU wheels

    def ready(self) -> dict:
        import jax

        import workloads
        from dpa4_jax import DPA4Calculator

        if self.args.worker == REF:
            import reference

            skipped = reference.unavailable()
            if skipped:
                return {"skipped": skipped}
            from dpa4_jax.config import load_model_config

            self.ref = reference.Reference(load_model_config(self.args.config))
            self.threads.update(reference.thread_info())
            return {"versions": reference.versions(), "threads": self.threads, "parameters": self.ref.num_params}
        calc0, variables = workloads.filled_model(self.args.config)
        if self.args.weights:
            with open(self.args.weights, "rb") as f:
                variables = DPA4Calculator.from_deepmd(pickle.load(f), dtype="float32").variables
        self.config, self.variables = calc0.config, variables
        return {"threads": self.threads, "parameters": calc0.num_params, "jax_devices": [str(d) for d in jax.devices()]}

    def export_weights(self, path: str) -> dict:
        """The reference's weights for ``--same-weights`` (the reference side only)."""
        with open(path, "wb") as f:
            pickle.dump(self.ref.serialized()["atomic_model"], f)
        return {"path": path}

    def setup(self, lattice: str, atoms: int, count: int, floor: bool) -> dict:
        """A fresh calculator and ``count`` structures; its first call (compilation) and one warm-up call."""
        self.frames = structures(atoms, count, lattice)
        out = {"formula": self.frames[0].get_chemical_formula()}
        if self.args.worker == REF:
            self.calc = self.ref.calculator()
        else:
            from dpa4_jax import DPA4Calculator

            self.calc = DPA4Calculator(self.config, self.variables, dtype="float32")
        out["first_call_s"] = evaluate(self.calc, self.frames[0])["wall_s"]
        evaluate(self.calc, self.frames[1])
        if self.args.worker == JAX:
            graph = self.calc.graph(self.frames[-1])
            budget = self.calc._budget
            out.update(edges=int(graph.n_edge[0]), padded_nodes=budget.n_node, padded_edges=budget.n_edge)
            if floor:  # one more compilation: the matrix products' FLOPs of E+F+V on this padded graph
                import workloads
                from common import xla_costs

                efv = workloads.model_functions(self.calc.config)[1]
                out["matmul_flops"] = xla_costs(efv, self.calc.variables, graph)[0]["matmul_flops"]
        return out

    def evaluate(self, index: int, results: bool) -> dict:
        out = evaluate(self.calc, self.frames[index])
        return out if results else {k: out[k] for k in ("wall_s", "cpu_s")}

    def finish(self) -> dict:
        return {"compilations": self.calc.compilations} if self.args.worker == JAX else {}

    def peak(self) -> dict:
        import jax.numpy as jnp

        return matmul_peak(jnp.float32, self.args.repeats)


def worker_main(args):
    worker = Worker(args)
    serve(worker.ready(), {"setup": worker.setup, "evaluate": worker.evaluate, "finish": worker.finish,
                           "peak": worker.peak, "export_weights": worker.export_weights})


def side_argv(args, name: str, weights: str | None = None) -> list[str]:
    argv = [str(HERE / "inference.py"), "--worker", name, "--threads", str(args.threads),
            "--config", args.config, "--repeats", str(args.repeats), "--cpus", *map(str, args.cpus)]
    return argv + (["--weights", weights] if weights else [])


def start_sides(args, tmp: str) -> tuple[list[Side], dict]:
    """The dpa4-jax side and, when it runs, the reference side (first with ``--same-weights``)."""
    sides, skipped, ref = [], "--no-reference" if args.no_reference else None, None
    if not args.no_reference:
        ref = Side(REF, side_argv(args, REF), args.cpus, python=args.reference_python)
        skipped = ref.ready.get("skipped")
        if skipped:
            ref.close()
            ref = None
    if args.same_weights and ref is None:
        sys.exit("--same-weights needs the reference: " + skipped)
    weights = ref.ask({"cmd": "export_weights", "path": str(Path(tmp) / "ref.pkl")})["path"] if args.same_weights else None
    sides = [Side(JAX, side_argv(args, JAX, weights), args.cpus)] + ([ref] if ref else [])
    return sides, {"reference_skipped": skipped}


# ------------------------------------------------------------------------------------------ driver


def max_abs(a, b) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def time_case(args, sides, lattice: str, n: int, floor: bool) -> dict:
    """One size: setup on every side, then ``--repeats`` rounds of one structure per side, alternating."""
    use = [s for s in sides if s.name == JAX or n <= (args.reference_max_atoms or n)]
    setup = {s.name: s.ask({"cmd": "setup", "lattice": lattice, "atoms": n, "count": args.repeats + 2, "floor": floor})
             for s in use}
    j = setup[JAX]
    row = {"lattice": lattice, "formula": j["formula"], "atoms": n, "edges": j["edges"]}
    answers = alternate(use, ({"cmd": "evaluate", "index": i, "results": args.same_weights}
                              for i in range(2, args.repeats + 2)))  # 0: first call, 1: warm-up (in setup)
    for s in use:
        walls, cpus = [a["wall_s"] for a in answers[s.name]], [a["cpu_s"] for a in answers[s.name]]
        row[s.name] = {"first_call_s": setup[s.name]["first_call_s"], **spread_row(walls, cpus, n)}
    row[JAX].update({k: j[k] for k in ("padded_nodes", "padded_edges", "matmul_flops") if k in j},
                    **sides[0].ask({"cmd": "finish"}))
    row[JAX]["compile_estimate_s"] = row[JAX]["first_call_s"] - row[JAX]["median_s"]
    if REF in row:
        ratios = [r["wall_s"] / a["wall_s"] for a, r in zip(answers[JAX], answers[REF])]
        row["speedup_median"] = row[REF]["median_s"] / row[JAX]["median_s"]
        row["speedup_cpu_median"] = row[REF]["cpu_median_s"] / row[JAX]["cpu_median_s"]
        row["speedup_per_round"] = spread(ratios)
    if args.same_weights:
        pairs = list(zip(answers[JAX], answers[REF]))
        row["max_abs_diff"] = {"energy_eV": max(abs(a["energy"] - r["energy"]) for a, r in pairs),
                               "forces_eV_per_A": max(max_abs(a["forces"], r["forces"]) for a, r in pairs),
                               "stress_eV_per_A3": max(max_abs(a["stress"], r["stress"]) for a, r in pairs)}
    return row


def spread_row(walls: list[float], cpus: list[float], n_atoms: int) -> dict:
    w, c = spread(walls), spread(cpus)
    return {"median_s": w["median"], "min_s": w["min"], "max_s": w["max"], "cpu_median_s": c["median"],
            "atoms_per_s": n_atoms / w["median"], "cpu_over_wall": sum(cpus) / sum(walls), "runs_s": walls,
            "cpu_runs_s": cpus}


def main():
    args = parse_args()
    if args.worker:
        return worker_main(args)
    host = machine()
    with tempfile.TemporaryDirectory(prefix="dpa4_inference_") as tmp:
        sides, skipped = start_sides(args, tmp)
        try:
            info = run(args, host, sides, skipped)
        finally:
            for s in sides:
                s.close()
    table(info["results"], REF in info["sides"])
    out = Path(args.output)
    write_json(info, out, plot(info, out.with_suffix(".png")) if args.sweep else None)


def run(args, host, sides, skipped) -> dict:
    set_threads(args.threads, args.cpus)  # the driver waits; jax in it only for the header
    jax_side = sides[0]
    info = header(host, **skipped, protocol="each side in its own process, pinned to the same cores "
                  f"({args.cpus}), asked in turn one structure each", repeats=args.repeats,
                  sides={s.name: {"command": s.command, **s.ready} for s in sides},
                  model={"config": args.config, "dtype": "float32", "weights": "reference's (--same-weights)"
                         if args.same_weights else "from_config(seed=0), zero weights filled"})
    print(f"dpa4-jax {jax_side.ready['parameters']:,} parameters, float32; {host['cpu']} x{host['cpu_count']}; "
          f"threads {args.threads} on cores {args.cpus}")
    print("reference: " + (f"DeePMD-kit {sides[1].ready['versions']['deepmd-kit']}, torch "
                           f"{sides[1].ready['versions']['torch']}" if len(sides) > 1 else f"skipped ({skipped['reference_skipped']})"))
    cases = ([(lattice, n) for lattice, sizes in SWEEP.items() for n in sizes] if args.sweep
             else [(lattice, n) for lattice in args.lattices for n in args.sizes])
    for lattice, n in cases:
        structures(n, 0, lattice)  # a size that is no supercell stops here, before any timing
    floor = not args.sweep  # one more compilation per size
    peaks = [jax_side.ask({"cmd": "peak"})] if floor else []
    results = []
    for lattice, n in cases:
        results.append(time_case(args, sides, lattice, n, floor))
        print_row(results[-1])
    if floor:
        peaks.append(jax_side.ask({"cmd": "peak"}))
        info["matmul_peak"] = dict(best_peak(peaks), runs_gflops=[p["gflops"] for p in peaks])
        for row in results:
            matmul_floor(row[JAX], info["matmul_peak"])
            if REF in row:
                row["reference_over_floor"] = row[REF]["median_s"] / row[JAX]["matmul_floor_s"]
                row[REF]["above_floor_s"] = row[REF]["median_s"] - row[JAX]["matmul_floor_s"]
    info.update(load_average_end=os.getloadavg(), results=results)
    return info


def print_row(row):
    j = row[JAX]
    msg = (f"  {row['formula']}, {row['edges']} edges (padded to {j['padded_edges']}): "
           f"dpa4-jax first call {j['first_call_s']:.1f} s, "
           f"median {j['median_s']:.3f} s (cpu {j['cpu_median_s']:.3f} s, compilations {j['compilations']})")
    if REF in row:
        r = row[REF]
        msg += f"; reference median {r['median_s']:.3f} s (cpu {r['cpu_median_s']:.3f} s)"
    if "max_abs_diff" in row:
        d = row["max_abs_diff"]
        msg += f"; max |dE| {d['energy_eV']:.2e} eV, |dF| {d['forces_eV_per_A']:.2e} eV/A, |ds| {d['stress_eV_per_A3']:.2e}"
    print(msg, flush=True)


def table(results, with_reference):
    floor = "matmul_floor_s" in results[0][JAX]
    head = ["lattice", "atoms", "edges", "|", "jax 1st call", "median", "range", "cpu", "atoms/s"]
    head += ["floor", "above"] if floor else []
    head += ["|", "ref median", "range", "cpu", "atoms/s", "|", "ref/jax", "per round", "cpu"] if with_reference else []
    head += ["ref/floor"] if floor and with_reference else []
    rows = []
    for r in results:
        j = r[JAX]
        line = [r["lattice"], r["atoms"], r["edges"], "|", f"{j['first_call_s']:.1f}", f"{j['median_s']:.3f}",
                f"{j['min_s']:.3f}-{j['max_s']:.3f}", f"{j['cpu_median_s']:.3f}", f"{j['atoms_per_s']:.0f}"]
        line += [f"{j['matmul_floor_s']:.3f}", f"{j['above_floor_s']:.3f}"] if floor else []
        if REF in r:
            f, pr = r[REF], r["speedup_per_round"]
            line += ["|", f"{f['median_s']:.3f}", f"{f['min_s']:.3f}-{f['max_s']:.3f}", f"{f['cpu_median_s']:.3f}",
                     f"{f['atoms_per_s']:.1f}", "|", f"{r['speedup_median']:.2f}x", f"{pr['min']:.2f}-{pr['max']:.2f}",
                     f"{r['speedup_cpu_median']:.2f}x"]
            line += [f"{r['reference_over_floor']:.2f}x"] if floor else []
        rows.append(line)
    print_table("E + F + stress, seconds per structure (median and range of the timed calls, median process CPU time)",
                head, rows,
                "jax 1st call = trace + XLA compilation + one evaluation"
                + ("; ref/jax = ratio of the medians (per round: range of the ratios of the calls made in the same round; "
                   "cpu: of the CPU-time medians)" if with_reference else "")
                + ("\nfloor = dpa4-jax's matrix-product FLOPs (E+F+V, padded graph) at the run's measured matmul peak: no "
                   "implementation of this algorithm is faster here; above = median - floor"
                   + ("; ref/floor = the most any could gain on the reference" if with_reference else "") if floor else ""))


def plot(info: dict, path: Path) -> Path | None:
    """Atoms per second against size, one line per lattice and implementation (the paper's Fig. 3)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for color, lattice in zip(("C0", "C1", "C2"), LATTICES):
        rows = [r for r in info["results"] if r["lattice"] == lattice]
        for impl, style in ((JAX, "-o"), (REF, "--s")):
            points = [(r["atoms"], r[impl]["atoms_per_s"]) for r in rows if impl in r]
            if points:
                ax.plot(*zip(*points), style, color=color, label=f"{impl}, {lattice} {LATTICES[lattice][0]['name']}")
    threads = info["sides"][JAX]["threads"]["threads"]
    ax.set(xscale="log", xlabel="atoms", ylabel="atoms / s (E + F + stress, float32)",
           title=f"DPA4-Air inference, {info['machine']['cpu']}, {threads} thread(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
