"""Training-step time and peak memory: op-by-op vs jit, float32 vs bf16 (paper Table S-2 analogue, CPU).

Four variants of the same dpa4-jax training step (``dpa4_jax.train.step``: energy,
forces and virial by grad, Eq. 43 loss, parameter gradient, HybridMuon, EMA) on the same
batch:

* ``jit``: ``training_functions(config, mesh)``'s ``jax.jit`` step on a one-device mesh (one XLA
  program; compiled ahead of time with ``.lower(...).compile()`` in the first call, to read its
  buffer sizes); model, state and padded batch as ``workloads.JaxStep`` builds them;
* ``op-by-op``: ``make_train_step(model, tx, StepSettings.of(config), mesh, jit=False)`` called under
  ``jax.disable_jit()`` (every primitive dispatched on its own, as eager PyTorch does). Since the step is
  data parallel (a ``shard_map`` inside), JAX compiles every primitive of a ``shard_map`` again at each
  call under ``disable_jit``: with a tiny model (8 channels, L = 1, 1 block) on one 32-atom cell (2 cores,
  load ~10) the first op-by-op call took 552 s and the second 638 s, where the pre-``shard_map`` step
  took 117 s then 4.4 s (``demo.yaml`` model). Op-by-op times now measure those compilations, not
  dispatch; ``results/compile_precision.json`` predates this;
* ``float32`` (``training.mixed_precision: none``) or ``bf16``
  (``training.mixed_precision: bf16``: matrix products in bfloat16, geometry, norms and the
  loss in float32; ``DPA4(config, matmul_dtype=jnp.bfloat16)``).

Each variant lives in its own worker process (spawned, so its memory is its own): it
builds the model and the batch, then runs a step whenever the main process asks. The
main process asks the four workers in turn, call by call (first call, ``--warmup``
calls, then ``--repeats`` timed calls each), so that their ratios are measured under the
same machine load. Memory: the worker's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), and its RSS just before the first step
(imports, model, batch: the same for all), whose difference is what the steps added; on
CPU that is dominated by XLA compilation (``jit``) and by the cache of one small compiled
executable per primitive and shape (``op-by-op``), not by activations. For ``jit`` the
compiled step's temporary buffers (``memory_analysis().temp_size_in_bytes``: activations
kept for the backward passes and workspace) are reported too.

Default: the ``configs/demo.yaml`` model (32 channels, L = 2, 2 blocks; 4 elements) on a
batch of two rattled 32-atom fcc Cu cells with EMT labels, so that the op-by-op variants
finish: before the data-parallel step the first op-by-op call took 1.5-2 minutes (one compilation
per primitive and shape), later ones seconds, and the whole default run about 7 minutes on 2 loaded
cores; now every op-by-op call takes about as long as the first (see ``op-by-op`` above). Thread
settings from ``common.set_threads`` (``--threads``, default 1).

Run from the repository root:

    python benchmarks/compile_precision.py
    python benchmarks/compile_precision.py --repeats 5 --frames 1 --atoms 108

Writes ``benchmarks/results/compile_precision.json`` and ``compile_precision.png`` (``--output``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from pathlib import Path

from common import RESULTS, ROOT, header, machine, print_table, pyplot, save_figure, set_threads, write_json

VARIANTS = [("op-by-op", "float32"), ("op-by-op", "bf16"), ("jit", "float32"), ("jit", "bf16")]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="model and optimizer of this YAML")
    p.add_argument("--atoms", type=int, default=32, choices=[32, 108, 256], help="atoms per fcc Cu cell")
    p.add_argument("--frames", type=int, default=2, help="cells per batch")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first one")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=str(RESULTS / "compile_precision.json"))
    return p.parse_args()


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def worker(conn, variant, args_dict):
    """Build one variant, then answer "step" with its wall time and "memory" with RSS figures."""
    set_threads(args_dict["threads"])
    import resource

    import jax

    from dpa4_jax.train import distributed
    from dpa4_jax.train.step import StepSettings, make_train_step
    from workloads import JaxStep, labelled_frames, train_config

    mode, precision = variant
    config = train_config(args_dict["config"], dtype="float32", mixed_precision="bf16" if precision == "bf16" else "none")
    # the model, its state and one padded batch, as train_step.py builds them (workloads.JaxStep)
    jax_step = JaxStep(config, labelled_frames(args_dict["frames"], args_dict["atoms"]))
    mesh, state, stats, batch = jax_step.mesh, jax_step.state, jax_step.stats, jax_step.batch
    step = jax_step.step if mode == "jit" else make_train_step(jax_step.model, jax_step.tx, StepSettings.of(config),
                                                                 mesh, jit=False)
    n_edges = jax_step.real_edges
    before = rss_kib()
    conn.send({"ready": True, "edges": n_edges, "parameters": int(sum(x.size for x in jax.tree.leaves(state.params))),
               "rss_before_kib": before})
    compiled, xla_memory = None, None
    while True:
        cmd = conn.recv()
        if cmd == "step":
            b = distributed.global_batch(batch, mesh)
            jax.block_until_ready(b)
            t = time.perf_counter()
            if mode == "jit":
                if compiled is None:  # ahead-of-time, to read XLA's buffer sizes; the same executable a call makes
                    compiled = step.lower(state, stats, b).compile()
                    m = compiled.memory_analysis()
                    xla_memory = {k: getattr(m, k) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                             "alias_size_in_bytes", "temp_size_in_bytes")}
                state, metrics = compiled(state, stats, b)
            else:
                with jax.disable_jit():
                    state, metrics = step(state, stats, b)
            jax.block_until_ready((state, metrics))
            wall = time.perf_counter() - t
            conn.send({"wall_s": wall, "loss": float(metrics["loss"])})
        elif cmd == "memory":
            conn.send({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rss_kib": rss_kib(),
                       "rss_before_kib": before, "xla_memory": xla_memory})
        else:
            conn.close()
            return


def main():
    args = parse_args()
    host = machine()
    ctx = mp.get_context("spawn")
    workers = {}
    t0 = time.perf_counter()
    for v in VARIANTS:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child, v, vars(args)), daemon=True)
        proc.start()
        workers[v] = (proc, parent)
    setup = {v: conn.recv() for v, (_, conn) in workers.items()}
    print(f"{len(VARIANTS)} workers ready in {time.perf_counter() - t0:.0f} s; batch of {args.frames} x {args.atoms} atoms, "
          f"{setup[VARIANTS[0]]['edges']} edges; {setup[VARIANTS[0]]['parameters']:,} parameters", flush=True)

    first, walls, losses = {}, {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}
    for i in range(1 + args.warmup + args.repeats):
        for v, (_, conn) in workers.items():
            conn.send("step")
            r = conn.recv()
            losses[v].append(r["loss"])
            print(f"  call {i}: {v[0]:8s} {v[1]:7s} {r['wall_s']:8.2f} s  loss {r['loss']:.4f}", flush=True)
            if i == 0:
                first[v] = r["wall_s"]
            elif i > args.warmup:
                walls[v].append(r["wall_s"])
    memory = {}
    for v, (proc, conn) in workers.items():
        conn.send("memory")
        memory[v] = conn.recv()
        conn.send("quit")
        proc.join(timeout=30)

    rows = []
    for v in VARIANTS:
        m = memory[v]
        rows.append({"mode": v[0], "precision": v[1], "first_call_s": first[v], "median_s": statistics.median(walls[v]),
                     "min_s": min(walls[v]), "runs_s": walls[v], "peak_rss_mib": m["peak_rss_kib"] / 1024,
                     "rss_before_first_step_mib": m["rss_before_kib"] / 1024,
                     "peak_increase_mib": (m["peak_rss_kib"] - m["rss_before_kib"]) / 1024,
                     "rss_after_last_step_mib": m["rss_kib"] / 1024,
                     "xla_temp_mib": m["xla_memory"]["temp_size_in_bytes"] / 2**20 if m["xla_memory"] else None,
                     "xla_memory_bytes": m["xla_memory"], "losses": losses[v]})
    slowest = max(r["median_s"] for r in rows)
    base = next(r for r in rows if r["mode"] == "op-by-op" and r["precision"] == "float32")
    most = max(r["peak_increase_mib"] for r in rows)
    for r in rows:
        r["time_rel_slowest"] = r["median_s"] / slowest
        r["speedup_vs_op_by_op_float32"] = base["median_s"] / r["median_s"]
        r["peak_increase_rel_max"] = r["peak_increase_mib"] / most

    info = header(host, cpu_flags_bf16=bf16_flags(),
                  threads={"threads": args.threads,
                           "XLA_FLAGS (workers)": "--xla_cpu_multi_thread_eigen=false" if args.threads == 1 else ""},
                  config=args.config, batch={"frames": args.frames, "atoms_per_frame": args.atoms,
                                             "edges": setup[VARIANTS[0]]["edges"]},
                  parameters=setup[VARIANTS[0]]["parameters"], warmup=args.warmup, repeats=args.repeats,
                  memory="peak RSS of each worker process (ru_maxrss); increase = peak - RSS before the first step "
                         "(includes XLA compilation for jit and the per-primitive executable cache for op-by-op); "
                         "xla_temp = temporary buffers of the compiled step (jit only, compiled.memory_analysis())",
                  results=rows)
    table(rows)
    out = Path(args.output)
    png = plot(rows, out.with_suffix(".png"))
    info["plot"] = str(png) if png else None
    write_json(info, out, png)


def bf16_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
        return sorted(x for x in flags if "bf16" in x or x.startswith("amx"))
    except (OSError, StopIteration):
        return []


def table(rows):
    print_table("Training step, seconds; memory MiB (rel. = to the slowest / to the largest increase; "
                "speedup = vs op-by-op float32)",
                ["mode", "precision", "|", "1st call", "median", "min", "rel.", "speedup", "|", "peak RSS", "+steps",
                 "rel.", "after", "XLA temp"],
                [[r["mode"], r["precision"], "|", f"{r['first_call_s']:.1f}", f"{r['median_s']:.2f}", f"{r['min_s']:.2f}",
                  f"{r['time_rel_slowest']:.2f}", f"{r['speedup_vs_op_by_op_float32']:.1f}x", "|",
                  f"{r['peak_rss_mib']:.0f}", f"{r['peak_increase_mib']:.0f}", f"{r['peak_increase_rel_max']:.2f}",
                  f"{r['rss_after_last_step_mib']:.0f}", "-" if r["xla_temp_mib"] is None else f"{r['xla_temp_mib']:.1f}"]
                 for r in rows],
                "+steps = peak RSS - RSS before the first step; after = RSS after the last step; "
                "XLA temp = the jitted step's temporary buffers")
    j32 = next(r for r in rows if r["mode"] == "jit" and r["precision"] == "float32")
    j16 = next(r for r in rows if r["mode"] == "jit" and r["precision"] == "bf16")
    ratio = j16["median_s"] / j32["median_s"]
    verdict = "about as fast as" if abs(ratio - 1) < 0.05 else ("slower than" if ratio > 1 else "faster than")
    print(f"jit bf16 is {verdict} jit float32 here ({ratio:.2f}x the time); "
          f"CPU bf16 flags: {', '.join(bf16_flags()) or 'none'}")


def plot(rows, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    labels = [f"{r['mode']}\n{r['precision']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].bar(labels, [r["median_s"] for r in rows], color=["tab:gray", "tab:gray", "tab:blue", "tab:blue"])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("median step time (s), log")
    axes[1].bar(labels, [r["peak_increase_mib"] for r in rows], color=["tab:gray", "tab:gray", "tab:blue", "tab:blue"])
    axes[1].set_ylabel("peak RSS increase over setup (MiB)")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
