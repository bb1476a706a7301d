"""One-GPU check of DPA4-Air in dpa4-jax (and the reference when it installs): peaks, E+F+V, a training step.

Prints and writes, on the first GPU (each part in a process of its own, ``common.Side``, so that every
peak device memory is its own; the processes run one after another):

* matmul peaks: a ``--peak-size`` square ``jnp.matmul`` in float32 at ``Precision.HIGHEST`` (IEEE float32),
  float32 at the default precision (TF32 on NVIDIA Ampere and later) and bf16;
* E+F+V (``physics.energy_forces_virial``) of rattled fcc Cu of ``--efv-atoms`` (1,000 and 10,000),
  float32 and bf16 mixed precision (matrix products in bf16): median time, XLA's FLOPs and bytes
  accessed, and the matrix products' floor at the matching peak (TF32 for float32, bf16 for bf16);
* the training step (``workloads.JaxStep``: E -> F, W -> Eq. 43 loss -> parameter gradient -> clip ->
  HybridMuon -> EMA, one jitted program) on a batch of ``--train-frames`` 108-atom frames (14: 1,512
  atoms), float32 and bf16 mixed precision: median step time and peak device memory;
* the reference (DeePMD-kit 3.2.0, PyTorch, ``use_compile`` and ``DP_COMPILE_INFER=1``, its compiled path,
  which needs torch 2.11) under ``--reference-python``, on the same structures and batch, when its
  PyTorch backend imports there; otherwise the reason it did not.

Budget: under 8 minutes on one H100 (compilation included); ``--smoke`` runs the same code on the CPU at
tiny sizes (32 / 108 atoms, one 32-atom frame, 512^2 peaks) to show that it works without a GPU.

    python benchmarks/gpu_check.py --reference-python /path/to/venv-with-deepmd/bin/python
    python benchmarks/gpu_check.py --smoke                     # on a CPU: the code path only

Writes ``benchmarks/results/gpu_check.json`` (``--output``; ``--smoke``: ``gpu_check_smoke.json``).
"""

from __future__ import annotations

import argparse
import os
import sys

from common import (HERE, RESULTS, Side, header, machine, matmul_floor, matmul_peak, print_table, serve, spread,
                    timed, write_json)
from workloads import AIR_CONFIG


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: check the code path")
    p.add_argument("--efv-atoms", type=int, nargs="+", default=None, help="fcc Cu sizes (default 1000 10000)")
    p.add_argument("--train-frames", type=int, default=None, help="108-atom frames per training batch (default 14)")
    p.add_argument("--precisions", nargs="+", default=["float32", "bf16"], choices=["float32", "bf16"])
    p.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up call")
    p.add_argument("--peak-size", type=int, default=None, help="side of the peak matmuls (default 8192)")
    p.add_argument("--config", default=AIR_CONFIG)
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--reference-python", default=sys.executable, help="interpreter with DeePMD-kit's PyTorch backend")
    p.add_argument("--output", default=None)
    p.add_argument("--worker", choices=["efv", "train", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    smoke = args.smoke
    args.efv_atoms = args.efv_atoms or ([32, 108] if smoke else [1000, 10000])
    args.train_frames = args.train_frames or (1 if smoke else 14)
    args.train_atoms = 32 if smoke else 108
    args.peak_size = args.peak_size or (512 if smoke else 8192)
    args.output = args.output or str(RESULTS / ("gpu_check_smoke.json" if smoke else "gpu_check.json"))
    return args


# ------------------------------------------------------------------------------------------ workers


def device_memory() -> dict:
    """Peak and limit of the first device's memory in GiB (None on a CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    gib = lambda k: stats[k] / 2**30 if k in stats else None
    return {"peak_gib": gib("peak_bytes_in_use"), "limit_gib": gib("bytes_limit")}


def start_jax(args):
    os.environ.setdefault("JAX_PLATFORMS", "cpu" if args.smoke else "cuda")
    import jax

    if not args.smoke and jax.devices()[0].platform != "gpu":
        raise SystemExit(f"gpu_check.py: jax sees no GPU ({jax.devices()}); --smoke runs on a CPU")
    return jax


def efv_worker(args):
    """Peaks, then E+F+V per precision and size."""
    jax = start_jax(args)
    import jax.numpy as jnp

    import workloads

    def peaks():
        size, highest = args.peak_size, jax.lax.Precision.HIGHEST
        return {"float32": matmul_peak(jnp.float32, args.repeats, precision=highest, size=size),
                "float32_default": matmul_peak(jnp.float32, args.repeats, size=size),
                "bf16": matmul_peak(jnp.bfloat16, args.repeats, size=size)}

    def efv(precision: str, atoms: int):
        calc, variables = workloads.filled_model(args.config)
        matmul_dtype = jnp.bfloat16 if precision == "bf16" else None
        case = workloads.size_cases(calc.config, jax.device_put(variables), atoms, functions=["efv"],
                                    precision=precision, matmul_dtype=matmul_dtype)[0]
        return {**case.row(), **timed(case, args.repeats), **device_memory()}

    serve({"devices": [str(d) for d in jax.devices()]}, {"peaks": peaks, "efv": efv})


def train_worker(args):
    """The training step on one batch in ``--precision``; its peak device memory."""
    jax = start_jax(args)
    import workloads

    config = workloads.train_config(args.config, dtype="float32",
                                    mixed_precision="bf16" if args.precision == "bf16" else "none")
    step = workloads.JaxStep(config, workloads.labelled_frames(args.train_frames, args.train_atoms))
    first = step()
    walls = [step() for _ in range(args.repeats + 1)][1:]
    serve({"devices": [str(d) for d in jax.devices()], "precision": args.precision, "first_call_s": first,
           **spread_s(walls), "atoms": args.train_frames * args.train_atoms, "edges": int(step.real_edges),
           "padded": {"nodes": step.budget.n_node, "edges": step.budget.n_edge}, **device_memory()}, {})


def reference_worker(args):
    """The reference's E+F+V (ASE calculator) and training step, compiled path on a GPU."""
    os.environ["DP_COMPILE_INFER"] = "0" if args.smoke else "1"
    import reference

    skipped = reference.unavailable()
    if skipped:
        return serve({"skipped": skipped}, {})
    import statistics
    import time

    import torch

    import workloads
    from dpa4_jax.config import load_model_config

    config = load_model_config(args.config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"versions": reference.versions(), "device": device, "use_compile": not args.smoke, "efv": []}
    try:
        ref = reference.Reference(config)
        for atoms in args.efv_atoms:
            calc, structure = ref.calculator(), workloads.fcc_cell(atoms)
            walls = []
            for i in range(args.repeats + 2):
                a = structure.copy()
                a.rattle(0.01, seed=i)  # a new structure each call: ASE would return the last results
                a.calc = calc
                t = time.perf_counter()
                a.get_potential_energy(), a.get_forces(), a.get_stress()
                walls.append(time.perf_counter() - t)
            out["efv"].append({"atoms": atoms, "first_call_s": walls[0], "median_s": statistics.median(walls[2:])})
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step = reference.TrainStep(config, workloads.labelled_frames(args.train_frames, args.train_atoms), gram=True,
                                   use_compile=not args.smoke, device=device)
        walls = [step() for _ in range(args.repeats + 2)]
        out["train"] = {"first_call_s": walls[0], **spread_s(walls[2:]),
                        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
    except Exception as e:  # the compiled path needs torch 2.11: say what failed and keep what ran
        out["failed"] = f"{type(e).__name__}: {e}"[:2000]
    serve(out, {})


def spread_s(walls) -> dict:
    s = spread(walls)
    return {"median_s": s["median"], "min_s": s["min"], "max_s": s["max"], "runs_s": walls}


# ------------------------------------------------------------------------------------------ driver


def main():
    args = parse_args()
    if args.worker:
        return {"efv": efv_worker, "train": train_worker, "reference": reference_worker}[args.worker](args)
    host = machine()
    cpus = sorted(os.sched_getaffinity(0))
    base = [str(HERE / "gpu_check.py"), "--config", args.config, "--repeats", str(args.repeats), "--efv-atoms",
            *map(str, args.efv_atoms), "--train-frames", str(args.train_frames), "--peak-size", str(args.peak_size)]
    base += ["--smoke"] if args.smoke else []
    results = {}

    side = Side("efv", base + ["--worker", "efv"], cpus)
    try:
        peaks = results["matmul_peaks"] = side.ask({"cmd": "peaks"})
        print("matmul peaks: " + ", ".join(f"{k} {p['gflops'] / 1000:.1f} TFLOP/s" for k, p in peaks.items()), flush=True)
        results["efv"] = []
        for precision in args.precisions:
            for atoms in args.efv_atoms:
                row = side.ask({"cmd": "efv", "precision": precision, "atoms": atoms})
                matmul_floor(row, peaks["bf16" if precision == "bf16" else "float32_default"])
                results["efv"].append(row)
                print(f"  E+F+V {precision} {atoms} atoms: {row['median_s']:.4f} s, floor {row['matmul_floor_s']:.4f} s, "
                      f"{row['bytes_accessed'] / 1e9:.1f} GB accessed", flush=True)
    finally:
        side.close()
    results["train"] = []
    for precision in args.precisions:
        side = Side(f"train-{precision}", base + ["--worker", "train", "--precision", precision], cpus)
        side.close()
        results["train"].append(side.ready)
        print(f"  training step {precision}, {side.ready['atoms']} atoms: {side.ready['median_s']:.3f} s, "
              f"peak memory {side.ready['peak_gib']} GiB", flush=True)
    if not args.no_reference:
        side = Side("reference", base + ["--worker", "reference"], cpus, python=args.reference_python)
        side.close()
        results["reference"] = side.ready
        print(f"  reference: {side.ready.get('skipped') or side.ready.get('failed') or 'ran'}", flush=True)
    info = header(host, smoke=args.smoke, config=args.config, repeats=args.repeats, **results)
    table(info)
    write_json(info, args.output)


def table(info):
    ref = info.get("reference", {})
    ref_efv = {r["atoms"]: r for r in ref.get("efv", [])}
    print_table("E+F+V (seconds; floor: the matrix products at the matching peak, TF32 for float32)",
                ["precision", "atoms", "edges", "|", "median", "floor", "GFLOP", "GB", "peak mem GiB", "|", "reference"],
                [[r["precision"], r["atoms"], r["edges"], "|", f"{r['median_s']:.4f}", f"{r['matmul_floor_s']:.4f}",
                  f"{r['flops'] / 1e9:.0f}", f"{r['bytes_accessed'] / 1e9:.1f}", r["peak_gib"], "|",
                  f"{ref_efv[r['atoms']]['median_s']:.4f}" if r["atoms"] in ref_efv and r["precision"] == "float32" else ""]
                 for r in info["efv"]])
    print_table("Training step (seconds, peak device memory)", ["precision", "atoms", "|", "median", "range", "peak GiB"],
                [[r["precision"], r["atoms"], "|", f"{r['median_s']:.3f}", f"{r['min_s']:.3f}-{r['max_s']:.3f}",
                  r["peak_gib"]] for r in info["train"]]
                + ([["reference", "", "|", f"{ref['train']['median_s']:.3f}", "", ref["train"]["peak_gib"]]]
                   if "train" in ref else []))
    if ref.get("skipped") or ref.get("failed"):
        print(f"reference: {ref.get('skipped') or ref.get('failed')}")


if __name__ == "__main__":
    main()
