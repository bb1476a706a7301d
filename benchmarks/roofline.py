"""How close DPA4-Air's forward pass, E+F+V and training step come to the machine's matmul peak.

Per size (fcc Cu supercells, a = 3.61 A, rattled 0.05 A; ``--sizes``) and model
(``configs/air_mptrj.yaml``, float32, zero weights filled as in ``inference.py``):

* ``forward``: the total energy (``physics.energy``);
* ``efv``: energy, forces and virial (``physics.energy_forces_virial``, one reverse pass);
* ``train`` (one 108-atom labelled frame, ``--train-atoms``): loss of paper Eq. 43 and its
  gradient in the parameters (second order: the forces are a gradient themselves), the part
  of the training step that is not the optimizer (``train_step.py --breakdown``: 0.2 s of 8.6 s).

For each: FLOPs and bytes accessed from XLA's ``cost_analysis`` of the compiled
function, the FLOPs of its matrix products alone (``op_profile.matmul_flops``: their time at the
peak is the floor no implementation of the algorithm beats), wall time (median of ``--repeats`` calls after one warm-up), GFLOP/s, and
that rate as a fraction of the matmul peak measured in the same run (a 2048 x 2048
float32 ``jnp.matmul``, timed before and after the model, the larger kept), all also per
process CPU second (one pinned core: the time the process actually ran). The
machine is shared, so absolute times are noisy: the ratios measured within one
run (E+F+V time over forward time, fraction of peak) are the figures to compare
between runs.

Threads as in ``inference.py`` (``--threads``, default 1: one pinned core,
``--xla_cpu_multi_thread_eigen=false``). ``--gpu``: float32 and bf16 matmul peaks
and E+F+V of ~1,000 and ~10,000 atoms in float32 and bf16 mixed precision on the
first GPU (written, not yet run: no GPU in the session that wrote it).

    python benchmarks/roofline.py                          # 32, 108, 256, 500 atoms + the training step
    python benchmarks/roofline.py --sizes 108 256 --output /tmp/roofline_108_256.json   # a quick check
    python benchmarks/roofline.py --gpu

Writes ``benchmarks/results/roofline.json`` (``--output``) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import inference

PEAK_SIZE = 2048
LATTICE_A = 3.61


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="atoms of the fcc Cu cells (4 a b c; default 32 108 256 500, with --gpu 1000 10000)")
    p.add_argument("--train-atoms", type=int, default=108, help="atoms of the training frame (0: skip the step)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per function, after one warm-up call")
    p.add_argument("--threads", type=int, default=1, help="CPU cores the process is pinned to (CPU mode)")
    p.add_argument("--gpu", action="store_true", help="GPU mode: float32 / bf16 peaks and E+F+V of large cells")
    p.add_argument("--config", default=str(ROOT / "configs" / "air_mptrj.yaml"), help="model section of this YAML")
    p.add_argument("--output", default=str(HERE / "results" / "roofline.json"))
    args = p.parse_args()
    if args.sizes is None:
        args.sizes = [1000, 10000] if args.gpu else [32, 108, 256, 500]
    return args


def fcc_cell(n_atoms: int, seed: int = 0):
    """Rattled fcc Cu of ``n_atoms = 4 a b c`` atoms, the repeats ``a <= b <= c`` as close to cubic as possible."""
    from ase.build import bulk

    if n_atoms % 4:
        raise ValueError(f"{n_atoms} atoms is no fcc supercell (4 a b c atoms)")
    cells = n_atoms // 4
    repeats = min(((a, b, cells // (a * b)) for a in range(1, cells + 1) for b in range(a, cells + 1)
                   if cells % (a * b) == 0 and b <= cells // (a * b)), key=lambda r: r[2] / r[0])
    atoms = bulk("Cu", "fcc", a=LATTICE_A, cubic=True).repeat(repeats)
    atoms.rattle(inference.RATTLE, seed=seed)
    return atoms


def timed(fn, repeats: int) -> dict:
    """Median and min wall seconds of ``fn()`` (results awaited) after one warm-up call, and the median
    process CPU seconds (on one pinned core, time the process ran: less sensitive to a shared machine's load)."""
    import jax

    jax.block_until_ready(fn())
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return {"median_s": statistics.median(walls), "min_s": min(walls), "runs_s": walls,
            "cpu_median_s": statistics.median(cpus)}


def costs(jitted, *args) -> tuple[dict, object]:
    """XLA's FLOPs and bytes accessed of ``jitted(*args)``, the FLOPs of its matrix products alone (the
    ``dot`` instructions of the optimized HLO), and the compiled executable."""
    import op_profile

    compiled = jitted.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "matmul_flops": op_profile.matmul_flops(compiled.as_text())}, compiled


def matmul_floor(row: dict, peak: dict) -> None:
    """Adds to a timed row the time its matrix products alone take at the measured peak (``matmul_floor_s``:
    no implementation of the same algorithm runs faster on this machine) and that floor over the time taken."""
    row["matmul_floor_s"] = row["matmul_flops"] / (peak["gflops"] * 1e9)
    row["floor_over_time"] = row["matmul_floor_s"] / row["median_s"]


def matmul_peak(dtype, repeats: int) -> dict:
    """GFLOP/s of a ``PEAK_SIZE`` square matmul in ``dtype`` (products accumulate in the dtype's default)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (PEAK_SIZE, PEAK_SIZE), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (PEAK_SIZE, PEAK_SIZE), jnp.float32).astype(dtype)
    f = jax.jit(jnp.matmul)
    t = timed(lambda: f(a, b), max(repeats, 5))
    flops = 2 * PEAK_SIZE**3
    return {"dtype": jnp.dtype(dtype).name, "size": PEAK_SIZE, **t, "gflops": flops / t["median_s"] / 1e9,
            "gflops_cpu": flops / t["cpu_median_s"] / 1e9}


def measure(name: str, jitted, args: tuple, repeats: int, extra: dict | None = None) -> dict:
    cost, compiled = costs(jitted, *args)
    t = timed(lambda: compiled(*args), repeats)
    row = {"function": name, **(extra or {}), **cost, **t,
           "gflops": cost["flops"] / t["median_s"] / 1e9, "gflops_cpu": cost["flops"] / t["cpu_median_s"] / 1e9,
           "flops_per_byte": cost["flops"] / max(cost["bytes_accessed"], 1.0)}
    print(f"  {name:>10} {row.get('atoms', ''):>6}: {cost['flops'] / 1e9:8.2f} GFLOP {cost['bytes_accessed'] / 1e9:7.2f} GB"
          f"  {t['median_s']:8.3f} s  {row['gflops']:7.1f} GFLOP/s", flush=True)
    return row


def model_functions(config, variables, matmul_dtype=None):
    import jax

    from dpa4_jax import physics
    from dpa4_jax.model import DPA4

    model = DPA4(config, param_dtype=jax.numpy.float32, matmul_dtype=matmul_dtype)
    forward = jax.jit(lambda v, g: physics.energy(model, v, g))
    efv = jax.jit(lambda v, g: physics.energy_forces_virial(model, v, g))
    return forward, efv


def size_rows(args, config, variables, sizes, modes) -> list[dict]:
    """forward and E+F+V per size, for every ``(label, matmul_dtype)`` in ``modes``."""
    import jax

    from dpa4_jax.calculator import DPA4Calculator

    rows = []
    for label, matmul_dtype in modes:
        forward, efv = model_functions(config, variables, matmul_dtype)
        for n in sizes:
            calc = DPA4Calculator(config, variables, dtype="float32")
            graph = jax.device_put(calc.graph(fcc_cell(n)))
            extra = {"atoms": n, "edges": int(graph.n_edge[0]), "padded_edges": int(graph.senders.shape[0]),
                     "precision": label}
            f = measure("forward", forward, (variables, graph), args.repeats, extra)
            e = measure("efv", efv, (variables, graph), args.repeats, extra)
            e["over_forward_time"] = e["median_s"] / f["median_s"]
            e["over_forward_cpu_time"] = e["cpu_median_s"] / f["cpu_median_s"]
            e["over_forward_flops"] = e["flops"] / f["flops"]
            rows += [f, e]
    return rows


def train_row(args, config) -> dict:
    """Loss and parameter gradient of one labelled ``--train-atoms`` frame, padded as ``train.py`` pads it."""
    import jax
    import jax.numpy as jnp
    import train_step

    from dpa4_jax import physics
    from dpa4_jax.train import loss as losses

    train_cfg = train_step.train_config(args.config, dtype="float32", mixed_precision="none")
    step = train_step.JaxStep(train_cfg, train_step.labelled_frames(1, args.train_atoms))
    model, stats = step.model, step.stats

    def loss_fn(params, batch):
        out = physics.energy_forces_virial(model, {"params": params, "stats": stats}, batch)
        return losses.loss(out, batch, train_cfg.loss)[0]

    batch = jax.tree.map(lambda x: jnp.asarray(x[0]), step.batch)
    return measure("train", jax.jit(jax.value_and_grad(loss_fn)), (step.state.params, batch), args.repeats,
                   {"atoms": args.train_atoms, "edges": int(step.real_edges), "padded_edges": step.budget.n_edge,
                    "precision": "float32"})


def main():
    args = parse_args()
    host = inference.machine()
    if args.gpu:
        os.environ.setdefault("JAX_PLATFORMS", "cuda")
        threads = {"threads": None}
    else:
        threads = inference.set_threads(args.threads)

    import jax
    import jax.numpy as jnp

    from dpa4_jax.calculator import DPA4Calculator

    if args.gpu and jax.devices()[0].platform != "gpu":
        sys.exit(f"--gpu: jax sees no GPU ({jax.devices()})")
    info = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": host,
            "jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()], "threads": threads,
            "load_average_start": os.getloadavg(), "repeats": args.repeats, "config": args.config,
            "note": "the machine is shared: compare the ratios measured within one run (efv over forward time, "
                    "fraction of the same run's matmul peak), not absolute times between runs"}
    calc0 = DPA4Calculator.from_config(args.config, seed=0, dtype="float32")
    config = calc0.config
    variables = jax.device_put(dict(calc0.variables, params=inference.fill_zero_weights(calc0.params)))
    peak_dtypes = [jnp.float32, jnp.bfloat16] if args.gpu else [jnp.float32]
    peaks = [matmul_peak(d, args.repeats) for d in peak_dtypes]
    for p in peaks:
        print(f"matmul peak {p['dtype']} {PEAK_SIZE}^2: {p['gflops']:.1f} GFLOP/s", flush=True)

    modes = [("float32", None), ("bf16", jnp.bfloat16)] if args.gpu else [("float32", None)]
    rows = size_rows(args, config, variables, args.sizes, modes)
    if args.train_atoms and not args.gpu:
        rows.append(train_row(args, config))

    # The peak again after the model: the larger of the two (the machine's load changes during the run).
    for p, d in zip(peaks, peak_dtypes):
        again = matmul_peak(d, args.repeats)
        p["gflops_after"], p["gflops_cpu_after"] = again["gflops"], again["gflops_cpu"]
        p["gflops"] = max(p["gflops"], again["gflops"])
        p["gflops_cpu"] = max(p["gflops_cpu"], again["gflops_cpu"])
    peak_of = {p["dtype"]: p for p in peaks}
    for r in rows:
        peak = peak_of["bfloat16" if r["precision"] == "bf16" else "float32"]
        r["fraction_of_peak"] = r["gflops"] / peak["gflops"]
        r["fraction_of_peak_cpu"] = r["gflops_cpu"] / peak["gflops_cpu"]
        matmul_floor(r, peak)
    info.update(matmul_peaks=peaks, results=rows, load_average_end=os.getloadavg())
    print_table(rows, peaks)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out}\nwrote {plot(info, out.with_suffix('.png'))}")


def print_table(rows, peaks):
    print("\nmatmul peak: " + ", ".join(f"{p['dtype']} {p['gflops']:.1f} GFLOP/s (per CPU second "
                                       f"{p['gflops_cpu']:.1f})" for p in peaks))
    head = (f"{'function':>8} {'prec':>7} {'atoms':>6} {'edges':>7} | {'GFLOP':>8} {'mm':>5} {'GB':>7} {'time s':>8} "
            f"{'GFLOP/s':>8} {'of peak':>7} {'cpu':>7} {'floor s':>7} | {'t/t_fwd':>7} {'cpu':>7} {'F/F_fwd':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = (f"{r['over_forward_time']:7.2f} {r['over_forward_cpu_time']:7.2f} {r['over_forward_flops']:7.2f}"
                 if "over_forward_time" in r else f"{'':>7} {'':>7} {'':>7}")
        print(f"{r['function']:>8} {r['precision']:>7} {r['atoms']:6d} {r['edges']:7d} | {r['flops'] / 1e9:8.2f} "
              f"{r['matmul_flops'] / r['flops']:5.2f} {r['bytes_accessed'] / 1e9:7.2f} {r['median_s']:8.3f} "
              f"{r['gflops']:8.1f} {r['fraction_of_peak']:7.2f} {r['fraction_of_peak_cpu']:7.2f} "
              f"{r['matmul_floor_s']:7.3f} | {ratio}")
    print("mm: share of the FLOPs in matrix products; of peak: GFLOP/s over the same run's matmul peak, by wall time "
          "and by process CPU time (cpu); floor: the matrix products' FLOPs at that peak (the time no implementation "
          "of this algorithm beats here); t/t_fwd: E+F+V time over the forward pass's")


def plot(info: dict, path: Path) -> Path:
    """GFLOP/s against atoms per function, with the matmul peak as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = info["results"]
    for (name, precision), style in zip(sorted({(r["function"], r["precision"]) for r in rows}),
                                        ("-o", "-s", "-^", "--o", "--s", "--^")):
        points = sorted((r["atoms"], r["gflops"]) for r in rows if (r["function"], r["precision"]) == (name, precision))
        ax.plot(*zip(*points), style, label=f"{name} ({precision})")
    for p, color in zip(info["matmul_peaks"], ("k", "grey")):
        ax.axhline(p["gflops"], color=color, ls=":", label=f"{PEAK_SIZE}$^2$ matmul {p['dtype']}")
    ax.set(xscale="log", xlabel="atoms", ylabel="GFLOP/s (XLA cost analysis / wall time)",
           title=f"DPA4-Air roofline, {info['machine']['cpu']}, {info['threads']['threads'] or 'GPU'} thread(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    main()
