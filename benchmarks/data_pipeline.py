"""The data pipeline at MPtrj scale: prepare a store, start training from it, feed batches, stay in memory.

On synthetic files in the MPtrj JSON layout (``dpa4_jax.data.synthetic``: random crystals of 8-100 atoms,
1-20 frames per material; written once under ``--workdir``, never into the repository), at two sizes
(``--sizes``, default 50k and 200k frames), it measures:

* **prepare**: ``dpa4_jax.data.store.prepare`` (streamed read, edge counts in ``--prepare-workers``
  processes) wall time and peak RSS;
* **first step** on each prepared store, in a fresh process: imports, opening the store, planning one epoch
  (``train.data.epoch_steps`` + ``Batcher.planned``: sizes only, no neighbour list), the first batch from
  ``train.pipeline.load_batches`` (2 workers), then one training step of a tiny model (compilation timed
  separately: it depends on the model, not on the data);
* **host throughput**: frames/s built into padded batches (~``--batch-atoms`` atoms, one sub-batch per
  step) with 0 (a background thread), 1, 2 and 4 worker processes, over ``--batches`` batches after the
  first, with the peak RSS of the process and its workers (sampled every 50 ms);
* the same for **the old in-memory path** (every frame read into a list, edge counts of all frames in
  parallel, then the same batches): time to first batch and RSS at both sizes; throughput at the small one
  (a worker process receives a pickled copy of the whole list).

Each measurement runs in its own process (``--phase``), so timings start cold and RSS is its own. Run from
the repository root; it is CPU heavy (the full run takes ~25 min on 2 cores):

    python benchmarks/data_pipeline.py                     # 50k and 200k frames, /tmp/dpa4_data_bench
    python benchmarks/data_pipeline.py --sizes 2000 8000 --batches 40 --workdir /tmp/small   # a quick check

Writes ``benchmarks/results/data_pipeline.json`` and ``data_pipeline.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import common
from common import HERE, ROOT, pyplot, save_figure, write_json

WORKERS = (0, 1, 2, 4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/dpa4_data_bench"), help="data files and stores")
    p.add_argument("--sizes", type=int, nargs=2, default=[50_000, 200_000], help="frames: small and large set")
    p.add_argument("--batches", type=int, default=300, help="batches timed per throughput run (after the first)")
    p.add_argument("--batch-atoms", type=int, default=1500)
    p.add_argument("--cutoff", type=float, default=6.0)
    p.add_argument("--prepare-workers", type=int, default=2)
    p.add_argument("--output", type=Path, default=HERE / "results" / "data_pipeline.json")
    p.add_argument("--phase", choices=["prepare", "first_step", "iterate"], help=argparse.SUPPRESS)
    p.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- phases (child processes)

def since_start() -> float:
    """Seconds since this process started (imports included)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def plan(n_atoms, n_edges, batch_atoms: int):
    """One epoch of one-sub-batch steps, as the training loop plans them (sizes only)."""
    from dpa4_jax.train.data import Batcher, epoch_steps

    steps = epoch_steps(n_atoms, batch_atoms, 1, seed=0, epoch=0)
    batcher = Batcher.planned(n_atoms, n_edges, steps, n_budgets=3)
    return [batcher.spec(step, slice(None)) for step in steps]


def open_source(args):
    from dpa4_jax.data.store import FrameStore, InMemoryFrames, default_workers

    if not args.memory:
        return FrameStore.open(args.store)
    from dpa4_jax.data import read_frames

    return InMemoryFrames(read_frames(args.source), args.cutoff, workers=default_workers())


def phase_prepare(args) -> dict:
    from dpa4_jax.data.store import prepare

    start = time.perf_counter()
    store = prepare(args.source, args.store, args.cutoff, workers=args.workers, progress=False)
    return {"prepare_s": time.perf_counter() - start, "frames": len(store), "atoms": int(store.n_atoms.sum()),
            "edges": int(store.n_edges.sum()), "store_bytes": sum(f.stat().st_size for f in store.path.iterdir())}


def phase_iterate(args) -> dict:
    from dpa4_jax.elements import MPTRJ_ELEMENTS
    from dpa4_jax.train.pipeline import load_batches

    t_imports = since_start()
    source = open_source(args)
    t_open = since_start()
    items = plan(source.n_atoms, source.n_edges, args.batch_atoms)[:args.batches + 1]
    t_plan = since_start()
    batches = load_batches(source, items, MPTRJ_ELEMENTS, args.cutoff, workers=args.workers)
    next(batches)
    t_first = since_start()
    tick = time.perf_counter()
    for _ in batches:
        pass
    elapsed = time.perf_counter() - tick
    frames = sum(len(f) for spec in items[1:] for f in spec.frames)
    return {"imports_s": t_imports, "open_s": t_open - t_imports, "plan_s": t_plan - t_open,
            "first_batch_s": t_first, "frames_timed": frames, "frames_per_s": frames / elapsed,
            "data_frames": len(source)}


def phase_first_step(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dpa4_jax.variables import init_variables
    from dpa4_jax.config import Config, DataConfig, ModelConfig, TrainingConfig
    from dpa4_jax.elements import MPTRJ_ELEMENTS
    from dpa4_jax.train import distributed
    from dpa4_jax.train.pipeline import load_batches
    from dpa4_jax.train.step import init_state, training_functions

    t_imports = since_start()
    source = open_source(args)
    items = plan(source.n_atoms, source.n_edges, args.batch_atoms)
    t_plan = since_start()
    batches = load_batches(source, items, MPTRJ_ELEMENTS, args.cutoff, workers=args.workers)
    batch = next(batches)
    t_first_batch = since_start()
    # A tiny model (every part of DPA4, few channels): the first step's compilation depends on the model only.
    model = ModelConfig(type_map=MPTRJ_ELEMENTS, channels=16, lmax=2, mmax=1, n_blocks=1, mixing_layers=1,
                        n_radial=8, rcut=args.cutoff, n_focus=1, radial_so2_rank=1)
    config = Config(model=model, data=DataConfig(train=str(args.store)),
                    training=TrainingConfig(steps=10, batch_atoms=args.batch_atoms))
    mesh = distributed.data_mesh()
    _, tx, _, step = training_functions(config, mesh)
    variables = init_variables(model, seed=0, dtype="float32")
    state = distributed.replicate(init_state(variables["params"], tx), mesh)
    stats = distributed.replicate({"energy_bias": jnp.zeros(len(MPTRJ_ELEMENTS), jnp.float32)}, mesh)
    device_batch = distributed.global_batch(batch, mesh)
    t_init = since_start()
    compiled = step.lower(state, stats, device_batch).compile()
    t_compiled = since_start()
    state, metrics = compiled(state, stats, device_batch)
    loss = float(jax.block_until_ready(metrics["loss"]))
    t_step = since_start()
    batches.close()
    return {"imports_s": t_imports, "plan_s": t_plan - t_imports, "first_batch_s": t_first_batch,
            "model_init_s": t_init - t_first_batch, "compile_s": t_compiled - t_init,
            "step_s": t_step - t_compiled, "first_step_s": t_step, "first_step_without_compile_s":
            t_step - (t_compiled - t_init), "loss": loss, "finite": bool(np.isfinite(loss)),
            "budget": dataclasses.asdict(items[0].budget), "steps_in_epoch": len(items),
            "data_frames": len(source)}


# --------------------------------------------------------------------------- driver

def run_phase(phase: str, **options) -> dict:
    """Run one phase in a fresh process; its result, with the peak RSS of the process and its workers."""
    import psutil

    cmd = [sys.executable, __file__, "--phase", phase]
    for key, value in options.items():
        if value is True:
            cmd.append(f"--{key}")
        elif value is not None and value is not False:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    print("  $", " ".join(cmd[2:]), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    peak = {"tree": 0, "main": 0, "anon": 0}

    def sample():
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                memory = [p.memory_info() for p in [parent, *parent.children(recursive=True)]]
            except psutil.Error:
                continue
            # RSS counts the store's mapped file pages (page cache, shared, reclaimable); rss - shared is the
            # processes' own (anonymous) memory.
            now = {"tree": sum(m.rss for m in memory), "main": memory[0].rss,
                   "anon": sum(m.rss - m.shared for m in memory)}
            peak.update({k: max(peak[k], now[k]) for k in peak})
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"phase {phase} {options} failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(peak_rss_mb=peak["tree"] / 2**20, peak_rss_main_mb=peak["main"] / 2**20,
                  peak_rss_anon_mb=peak["anon"] / 2**20)
    print("   ", {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}, flush=True)
    return result


def generate(path: Path, frames: int) -> float:
    from dpa4_jax.data.synthetic import write_synthetic_mptrj

    if path.exists():
        return float("nan")
    start = time.perf_counter()
    partial = path.with_suffix(".partial")
    write_synthetic_mptrj(partial, frames, seed=0, progress=True)
    partial.rename(path)
    return time.perf_counter() - start


def measure(args) -> dict:
    small, large = args.sizes
    common = dict(cutoff=args.cutoff, batch_atoms=args.batch_atoms)
    results = {"prepare": {}, "first_step": {}, "store": {}, "in_memory": {}}
    for n in (small, large):
        src, store = args.workdir / f"mptrj_{n}.json", args.workdir / f"store_{n}"
        print(f"{n} frames:", flush=True)
        results.setdefault("generate_s", {})[n] = generate(src, n)
        if not store.exists():
            results["prepare"][n] = dict(run_phase("prepare", source=src, store=store, workers=args.prepare_workers,
                                                   **common), json_bytes=src.stat().st_size)
        results["first_step"][n] = run_phase("first_step", store=store, workers=2, **common)
        results["store"][n] = {w: run_phase("iterate", store=store, workers=w, batches=args.batches, **common)
                               for w in WORKERS}
        mem_workers = WORKERS if n == small else (0,)
        results["in_memory"][n] = {w: run_phase("iterate", source=src, memory=True, workers=w,
                                                batches=args.batches, **common) for w in mem_workers}
    return results


def header() -> dict:
    import grain
    import vesin

    info = common.header()
    info["versions"].update(grain=grain.__version__, vesin=vesin.__version__)
    return info


def plot(info: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    r, (small, large) = info["results"], info["sizes"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, runs, style in ((f"store, {small // 1000}k frames", r["store"][small], "o-"),
                               (f"store, {large // 1000}k frames", r["store"][large], "s-"),
                               (f"in memory, {small // 1000}k frames", r["in_memory"][small], "^--")):
        ws = sorted(runs)
        ax1.plot(ws, [runs[w]["frames_per_s"] for w in ws], style, label=label)
    ax1.axvline(info["results"]["cores"], color="grey", lw=0.8, ls=":")
    ax1.text(info["results"]["cores"], ax1.get_ylim()[0], f" {info['results']['cores']} cores", color="grey")
    ax1.set(xlabel="worker processes (0: one thread)", ylabel="host frames/s", title="batches built per second",
            xticks=list(WORKERS))
    ax1.legend(fontsize=8)
    sizes = [small, large]
    for label, rss, style in (("store, 0 workers", [r["store"][n][0]["peak_rss_mb"] for n in sizes], "o-"),
                              ("store, 2 workers", [r["store"][n][2]["peak_rss_mb"] for n in sizes], "s-"),
                              ("in memory, 0 workers", [r["in_memory"][n][0]["peak_rss_mb"] for n in sizes], "^--")):
        ax2.plot([n / 1000 for n in sizes], [x / 1024 for x in rss], style, label=label)
    ax2.set(xlabel="frames in the data set (thousands)", ylabel="peak RSS, process + workers (GiB)",
            title="memory while iterating", ylim=(0, None))
    ax2.legend(fontsize=8)
    fs, mem = r["first_step"][large], r["in_memory"][large][0]
    bars = [("prepare (once)", r["prepare"].get(large, {}).get("prepare_s", float("nan"))),
            ("store: first batch", fs["first_batch_s"]), ("store: first step\n(tiny model)", fs["first_step_s"]),
            ("in memory: first batch", mem["first_batch_s"])]
    ax3.barh([b[0] for b in bars], [b[1] for b in bars], color=["grey", "C0", "C0", "C2"])
    ax3.barh(["store: first step\n(tiny model)"], [fs["compile_s"]], left=[fs["first_step_s"] - fs["step_s"]
                                                                          - fs["compile_s"]],
             color="C1", label="of which compilation")
    ax3.invert_yaxis()
    ax3.set(xlabel="seconds from process start", title=f"{large // 1000}k frames")
    ax3.legend(fontsize=8)
    fig.suptitle(f"dpa4-jax data pipeline, synthetic MPtrj layout, {info['machine']['cpu']} "
                 f"({info['machine']['cpus_usable']} cores), {info['date'][:10]}", fontsize=9)
    return save_figure(fig, path.with_suffix(".png"))


def main():
    args = parse_args()
    if args.phase:
        sys.path.insert(0, str(ROOT))
        result = {"prepare": phase_prepare, "iterate": phase_iterate, "first_step": phase_first_step}[args.phase](args)
        print(json.dumps(result))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    info = dict(header(), sizes=args.sizes, batch_atoms=args.batch_atoms, cutoff=args.cutoff,
                batches_timed=args.batches, workdir=str(args.workdir))
    info["results"] = dict(measure(args), cores=len(os.sched_getaffinity(0)))
    write_json(info, args.output, plot(info, args.output))


if __name__ == "__main__":
    main()
