"""How close DPA4-Air's forward pass, E+F+V and training step come to the machine's matmul peak.

Per size (fcc Cu supercells, a = 3.61 A, rattled 0.05 A; ``--sizes``) and model
(``configs/air_mptrj.yaml``, float32, zero weights filled (``common.fill_zero_weights``)):

* ``forward``: the total energy (``physics.energy``);
* ``efv``: energy, forces and virial (``physics.energy_forces_virial``, one reverse pass);
* ``train`` (one 108-atom labelled frame, ``--train-atoms``): loss of paper Eq. 43 and its
  gradient in the parameters (second order: the forces are a gradient themselves), the part
  of the training step that is not the optimizer (``train_step.py --breakdown``: 0.2 s of 8.6 s).

For each: FLOPs and bytes accessed from XLA's ``cost_analysis`` of the compiled
function, the FLOPs of its matrix products alone (``common.matmul_flops``: their time at the
peak is the floor no implementation of the algorithm beats), wall time (median of ``--repeats`` calls after one warm-up), GFLOP/s, and
that rate as a fraction of the matmul peak measured in the same run (a 2048 x 2048
float32 ``jnp.matmul``, timed before and after the model, the larger kept), all also per
process CPU second (one pinned core: the time the process actually ran). The
machine is shared, so absolute times are noisy: the ratios measured within one
run (E+F+V time over forward time, fraction of peak) are the figures to compare
between runs.

Bytes: XLA's "bytes accessed" of the compiled function (every HLO operation's operands and
result, fusions counted at their boundaries) is the machine-independent figure that predicts the
time of the memory-bound rest on a machine whose matrix units are fast (a GPU, an AVX-512 or AMX
core): it is reported beside the FLOPs, with the FLOPs per byte.

Threads (``--threads``, default 1: one pinned core, ``--xla_cpu_multi_thread_eigen=false``) as
``common.set_threads`` sets them. On a GPU: ``benchmarks/gpu_check.py``.

    python benchmarks/roofline.py                          # 32, 108, 256, 500 atoms + the training step
    python benchmarks/roofline.py --sizes 108 256 --output /tmp/roofline_108_256.json   # a quick check

Writes ``benchmarks/results/roofline.json`` (``--output``) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from common import (PEAK_SIZE, RESULTS, best_peak, header, matmul_floor, matmul_peak, print_table, pyplot,
                    save_figure, set_threads, timed, write_json)
from workloads import AIR_CONFIG


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 108, 256, 500], help="atoms of the fcc Cu cells (4 a b c)")
    p.add_argument("--train-atoms", type=int, default=108, help="atoms of the training frame (0: skip the step)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per function, after one warm-up call")
    p.add_argument("--threads", type=int, default=1, help="CPU cores the process is pinned to")
    p.add_argument("--config", default=AIR_CONFIG, help="model section of this YAML")
    p.add_argument("--output", default=str(RESULTS / "roofline.json"))
    return p.parse_args()


def measure(case, repeats: int) -> dict:
    """XLA's costs and the timing of one compiled case (``workloads.Case``)."""
    t = timed(case, repeats)
    cost = case.costs
    row = {**case.row(), **t, "gflops": cost["flops"] / t["median_s"] / 1e9,
           "gflops_cpu": cost["flops"] / t["cpu_median_s"] / 1e9,
           "flops_per_byte": cost["flops"] / max(cost["bytes_accessed"], 1.0)}
    print(f"  {case.function:>10} {case.atoms:>6}: {cost['flops'] / 1e9:8.2f} GFLOP {cost['bytes_accessed'] / 1e9:7.2f} GB"
          f"  {t['median_s']:8.3f} s  {row['gflops']:7.1f} GFLOP/s", flush=True)
    return row


def size_rows(args, config, variables) -> list[dict]:
    """forward and E+F+V per size."""
    import workloads

    rows = []
    for n in args.sizes:
        f, e = (measure(case, args.repeats) for case in workloads.size_cases(config, variables, n))
        e["over_forward_time"] = e["median_s"] / f["median_s"]
        e["over_forward_cpu_time"] = e["cpu_median_s"] / f["cpu_median_s"]
        e["over_forward_flops"] = e["flops"] / f["flops"]
        e["over_forward_bytes"] = e["bytes_accessed"] / f["bytes_accessed"]
        rows += [f, e]
    return rows


def main():
    args = parse_args()
    threads = set_threads(args.threads)

    import jax
    import jax.numpy as jnp

    import workloads

    info = header(threads=threads, repeats=args.repeats, config=args.config,
                  note="the machine is shared: compare the ratios measured within one run (efv over forward time, "
                       "fraction of the same run's matmul peak), not absolute times between runs")
    calc, variables = workloads.filled_model(args.config)
    variables = jax.device_put(variables)
    peaks = [matmul_peak(jnp.float32, args.repeats)]
    print(f"matmul peak float32 {PEAK_SIZE}^2: {peaks[0]['gflops']:.1f} GFLOP/s", flush=True)
    rows = size_rows(args, calc.config, variables)
    if args.train_atoms:
        rows.append(measure(workloads.train_case(args.config, args.train_atoms), args.repeats))
    peaks.append(matmul_peak(jnp.float32, args.repeats))  # again after the model: the larger is kept
    peak = dict(best_peak(peaks), runs_gflops=[p["gflops"] for p in peaks])
    for r in rows:
        r["fraction_of_peak"] = r["gflops"] / peak["gflops"]
        r["fraction_of_peak_cpu"] = r["gflops_cpu"] / peak["gflops_cpu"]
        matmul_floor(r, peak)
    info.update(matmul_peaks=[peak], results=rows, load_average_end=os.getloadavg())
    table(rows, peak)
    out = Path(args.output)
    write_json(info, out, plot(info, out.with_suffix(".png")))


def table(rows, peak):
    print_table(
        f"matmul peak: float32 {peak['gflops']:.1f} GFLOP/s (per CPU second {peak['gflops_cpu']:.1f})",
        ["function", "atoms", "edges", "|", "GFLOP", "mm", "GB", "F/B", "time s", "cpu s", "GFLOP/s", "of peak",
         "cpu", "floor s", "above", "|", "t/t_fwd", "cpu", "F/F_fwd", "B/B_fwd"],
        [[r["function"], r["atoms"], r["edges"], "|", f"{r['flops'] / 1e9:.2f}", f"{r['matmul_flops'] / r['flops']:.2f}",
          f"{r['bytes_accessed'] / 1e9:.2f}", f"{r['flops_per_byte']:.1f}", f"{r['median_s']:.3f}",
          f"{r['cpu_median_s']:.3f}", f"{r['gflops']:.1f}", f"{r['fraction_of_peak']:.2f}",
          f"{r['fraction_of_peak_cpu']:.2f}", f"{r['matmul_floor_s']:.3f}", f"{r['above_floor_s']:.3f}", "|"]
         + ([f"{r[k]:.2f}" for k in ("over_forward_time", "over_forward_cpu_time", "over_forward_flops",
                                       "over_forward_bytes")] if "over_forward_time" in r else [])
         for r in rows],
        "mm: share of the FLOPs in matrix products; GB: XLA's bytes accessed; F/B: FLOPs per byte; of peak: GFLOP/s "
        "over the same run's matmul peak, by wall time and by process CPU time (cpu); floor: the matrix products' "
        "FLOPs at that peak (the time no implementation of this algorithm beats here); above: time - floor; "
        "t/t_fwd, F/F_fwd, B/B_fwd: E+F+V over the forward pass (time, FLOPs, bytes)")


def plot(info: dict, path: Path) -> Path | None:
    """GFLOP/s and bytes accessed against atoms per function, with the matmul peak as a line."""
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.2))
    rows = info["results"]
    for name, style in zip(("forward", "efv", "train"), ("-o", "-s", "^")):
        points = sorted((r["atoms"], r["gflops"], r["bytes_accessed"] / 1e9) for r in rows if r["function"] == name)
        if points:
            atoms, gflops, gb = zip(*points)
            ax.plot(atoms, gflops, style, label=name)
            bx.plot(atoms, gb, style, label=name)
    for p in info["matmul_peaks"]:
        ax.axhline(p["gflops"], color="k", ls=":", label=f"{PEAK_SIZE}$^2$ matmul {p['dtype']}")
    ax.set(xscale="log", xlabel="atoms", ylabel="GFLOP/s (XLA cost analysis / wall time)",
           title=f"DPA4-Air roofline, {info['machine']['cpu']}, {info['threads']['threads']} thread(s)")
    bx.set(xscale="log", yscale="log", xlabel="atoms", ylabel="GB accessed per call (XLA cost analysis)",
           title="bytes accessed (machine-independent)")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
