"""A/B of dpa4-jax checkouts: E+F+V and the training gradient, each checkout in a process of its own.

Every checkout named by ``--trees NAME=PATH`` runs as a ``common.Side`` (``PYTHONPATH=PATH``, so its
``dpa4_jax``; this checkout's ``benchmarks/workloads.py`` builds the same work for all), all pinned
to the same cores (``--cpus``), and they are timed in turn, one call each (A B A B ...), for
``--rounds`` rounds after one warm-up call each. The work (``workloads``): DPA4-Air (float32,
zero weights filled) E+F+V (``physics.energy_forces_virial``) on rattled fcc Cu of ``--efv-atoms``
atoms, and the loss + parameter gradient of one labelled ``--train-atoms`` frame (second order).

Per case and checkout: XLA's FLOPs and bytes accessed of the compiled function, the FLOPs of its
matrix products and their time at the matmul peak (the floor; the peak is a 2048^2 float32 matmul
in the first checkout's process, before and after, the larger kept), the median and range of the
wall and process CPU times, and the time above the floor; per case, each checkout against the
first: the ratio of the medians and the range of the per-round ratios, and the bytes ratio.
Process CPU time is the figure to read on a shared machine (a pinned process's own time).

    python benchmarks/ab.py --trees main=/path/to/main speed=. --rounds 7
    python benchmarks/ab.py --trees main=/path/to/main speed=. --costs-only   # XLA's counts, no timing

Writes ``benchmarks/results/ab.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from common import (HERE, RESULTS, Side, alternate, best_peak, header, machine, matmul_floor, matmul_peak, print_table,
                    serve, set_threads, spread, timed_call, write_json)
from workloads import AIR_CONFIG


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trees", nargs="+", required=True, help="NAME=PATH of each dpa4-jax checkout (the first: the base)")
    p.add_argument("--efv-atoms", type=int, nargs="*", default=[108, 256], help="fcc Cu sizes of the E+F+V cases")
    p.add_argument("--train-atoms", type=int, nargs="*", default=[108], help="atoms of the training-gradient cases")
    p.add_argument("--rounds", type=int, default=7, help="timed calls per case and checkout, alternating")
    p.add_argument("--costs-only", action="store_true", help="XLA's FLOPs and bytes only, no timing")
    p.add_argument("--cpus", type=int, nargs="+", default=None, help="cores every side is pinned to (default: the first)")
    p.add_argument("--config", default=AIR_CONFIG)
    p.add_argument("--output", default=str(RESULTS / "ab.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cpus = args.cpus or sorted(os.sched_getaffinity(0))[:1]
    return args


def worker_main(args):
    set_threads(len(args.cpus), args.cpus)
    import jax
    import jax.numpy as jnp

    import dpa4_jax
    import workloads

    calc, variables = workloads.filled_model(args.config)
    variables = jax.device_put(variables)
    cases = [c for n in args.efv_atoms for c in workloads.size_cases(calc.config, variables, n, functions=["efv"])]
    cases += [workloads.train_case(args.config, n) for n in args.train_atoms]
    ready = {"dpa4_jax": str(Path(dpa4_jax.__file__).parent), "cases": [c.row() for c in cases]}
    serve(ready, {"time": lambda case: timed_call(cases[case]),
                  "peak": lambda: matmul_peak(jnp.float32, 5)})


def main():
    args = parse_args()
    if args.worker:
        return worker_main(args)
    host = machine()
    trees = dict(t.split("=", 1) for t in args.trees)
    argv = [str(HERE / "ab.py"), "--worker", "--trees", *args.trees, "--config", args.config, "--cpus",
            *map(str, args.cpus), "--efv-atoms", *map(str, args.efv_atoms), "--train-atoms", *map(str, args.train_atoms)]
    sides = []
    try:
        for name, path in trees.items():
            sides.append(Side(name, argv, args.cpus, pythonpath=path))
            print(f"{name}: dpa4_jax from {sides[-1].ready['dpa4_jax']}, {len(sides[-1].ready['cases'])} cases compiled",
                  flush=True)
        set_threads(len(args.cpus), args.cpus)
        info = header(host, protocol=f"each checkout in its own process pinned to cores {args.cpus}, one call each "
                                     "in turn", trees=trees, rounds=args.rounds, config=args.config)
        rows = measure(args, sides)
    finally:
        for s in sides:
            s.close()
    info.update(results=rows, load_average_end=os.getloadavg())
    table(rows, list(trees))
    write_json(info, args.output)


def measure(args, sides) -> list[dict]:
    base = sides[0]
    peaks = [] if args.costs_only else [base.ask({"cmd": "peak"})]
    rows = []
    for i, case in enumerate(base.ready["cases"]):
        row = {k: case[k] for k in ("function", "atoms", "edges", "padded_edges")}
        for s in sides:
            row[s.name] = dict(s.ready["cases"][i])
        if not args.costs_only:
            alternate(sides, [{"cmd": "time", "case": i}])  # warm-up
            answers = alternate(sides, ({"cmd": "time", "case": i} for _ in range(args.rounds)))
            for s in sides:
                walls, cpus = [a["wall_s"] for a in answers[s.name]], [a["cpu_s"] for a in answers[s.name]]
                w, c = spread(walls), spread(cpus)
                row[s.name].update(median_s=w["median"], min_s=w["min"], max_s=w["max"], cpu_median_s=c["median"],
                                   cpu_min_s=c["min"], cpu_max_s=c["max"], runs_s=walls, cpu_runs_s=cpus)
                if s is not base:
                    row[s.name]["over_base_per_round_cpu"] = spread(
                        [b["cpu_s"] / a["cpu_s"] for a, b in zip(answers[base.name], answers[s.name])])
            print(f"  {row['function']} {row['atoms']}: " + ", ".join(
                f"{s.name} {row[s.name]['cpu_median_s']:.3f} s cpu" for s in sides), flush=True)
        rows.append(row)
    if not args.costs_only:
        peaks.append(base.ask({"cmd": "peak"}))
        peak = best_peak(peaks)
        for row in rows:
            for s in sides:
                matmul_floor(row[s.name], peak)
                row[s.name]["peak_gflops"] = peak["gflops"]
    return rows


def table(rows, names):
    timed = "median_s" in rows[0][names[0]]
    head = ["function", "atoms", "tree", "|", "GFLOP", "mm GFLOP", "GB", "bytes/base"]
    head += ["|", "wall", "cpu", "cpu range", "floor", "above (cpu)", "above/base", "cpu/base", "per round"] if timed else []
    lines = []
    for r in rows:
        b = r[names[0]]
        for name in names:
            x = r[name]
            line = [r["function"], r["atoms"], name, "|", f"{x['flops'] / 1e9:.1f}", f"{x['matmul_flops'] / 1e9:.1f}",
                    f"{x['bytes_accessed'] / 1e9:.2f}", f"{x['bytes_accessed'] / b['bytes_accessed']:.2f}"]
            if timed:
                pr = x.get("over_base_per_round_cpu")
                line += ["|", f"{x['median_s']:.3f}", f"{x['cpu_median_s']:.3f}", f"{x['cpu_min_s']:.3f}-{x['cpu_max_s']:.3f}",
                         f"{x['matmul_floor_cpu_s']:.3f}", f"{x['above_floor_cpu_s']:.3f}",
                         f"{x['above_floor_cpu_s'] / b['above_floor_cpu_s']:.2f}",
                         f"{x['cpu_median_s'] / b['cpu_median_s']:.2f}",
                         f"{pr['min']:.2f}-{pr['max']:.2f}" if pr else ""]
            lines.append(line)
    print_table("A/B: XLA's costs and times per checkout (seconds; the first checkout is the base)", head, lines,
                "mm GFLOP: matrix products; GB: XLA's bytes accessed; floor: mm FLOPs at the run's matmul peak per CPU "
                "second; above (cpu): median process CPU time - floor; per round: range of the per-round CPU-time ratios")


if __name__ == "__main__":
    main()
