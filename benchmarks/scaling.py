"""Data-parallel scaling of the training step: steps/s and frames/s on 1, 2 and 4 devices, and on one GPU.

The step is the real one: ``dpa4_jax.train.step.training_functions(config, mesh)`` (energy, forces and
virial by grad, Eq. 43 loss over the global batch's label counts, one ``psum`` of the gradients, HybridMuon,
EMA), state replicated with ``train.distributed.replicate``, batches planned and padded as ``train.py``
does (``train.data.epoch_steps``, ``Batcher``, ``train.pipeline.build_batch``) and put on the mesh with
``distributed.global_batch``. Host batches are built before the timing (the host pipeline has its own
benchmark, ``data_pipeline.py``); the timed loop is host-to-device copy + step, as in the training loop.

CPU mode (default): ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set here before jax is
imported) gives 4 emulated CPU devices, **which share the same CPU cores** (2 on the machine of the
committed results): this checks the code path (equal losses, one compilation per mesh and padded shape),
not speed. A tiny model (``workloads.EPOCH_MODEL`` on ``configs/demo.yaml``'s cutoff, batching and
optimizer) on ``dpa4_jax.data.make_emt_dataset`` frames (4-32 atom Al/Ni/Cu/Au cells), every sub-batch of
~``batch_atoms`` atoms padded to one shape planned over the whole epoch:

* **weak scaling**: one sub-batch per device (``training.sub_batches`` = devices, the training loop's
  default), so the global batch grows with the devices;
* **strong scaling**: a fixed global batch of ``sub_batches=4`` (4, 2, 1 sub-batches per device on 1, 2,
  4 devices). From the same initial state and on the same batches, the loss of every step must be the same
  on 1, 2 and 4 devices (to ``LOSS_RTOL``, the float32 tolerance of ``tests/test_distributed.py``);
  the JSON reports the largest relative difference and whether it is within that tolerance.

Weak and strong scaling on 4 devices are the same global batch on the same mesh: they share one compiled
step and must give identical losses (the JSON counts the new compilations of each run).

GPU mode (``--gpu``, needs a CUDA GPU and jax with CUDA; it stops with a message naming the devices jax
sees otherwise): one GPU, the model, optimizer and loss of ``configs/air_mptrj.yaml`` (DPA4-Air, 2.76M
parameters, float32 weights), one sub-batch of >= ``--gpu-batch-atoms`` (1,500) atoms of synthetic
MPtrj-layout frames (``dpa4_jax.data.synthetic``: 8-100 atom crystals of the 89 MPtrj elements),
``training.mixed_precision`` ``none`` (float32) vs ``bf16``, each in its own process: first call (trace,
compilation, one step), steps/s, frames/s, atoms/s, and the peak device memory of the process
(``jax.devices()[0].memory_stats()["peak_bytes_in_use"]``).

Run from the repository root:

    python benchmarks/scaling.py                 # CPU, 1/2/4 emulated devices (~5-10 min on 2 loaded cores)
    python benchmarks/scaling.py --gpu           # on a GPU machine

Writes ``benchmarks/results/scaling.json`` and ``scaling.png`` (CPU) or ``scaling_gpu.json`` (``--gpu``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import HERE, ROOT, fill_zero_weights, print_table, pyplot, save_figure, set_threads, write_json

DEVICE_COUNTS = (1, 2, 4)
STRONG_SUB_BATCHES = 4  # the fixed global batch of the strong-scaling runs
LOSS_RTOL = 2e-4  # float32: sums over sub-batches in another order (tests/test_distributed.py)
EMULATED = (f"{max(DEVICE_COUNTS)} emulated CPU devices (--xla_force_host_platform_device_count) share the "
            "same CPU cores: this checks the data-parallel code path (equal losses, compilations), not speed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="one real GPU: Air, bf16 vs float32, peak device memory")
    p.add_argument("--config", default=None,
                   help="YAML whose model, optimizer, loss (and, on CPU, batching) are used "
                        "(default: configs/demo.yaml with a tiny model on CPU, configs/air_mptrj.yaml with --gpu)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames generated: EMT on CPU (default 240), synthetic MPtrj with --gpu (default 600)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run, after the first (compiling) one")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU cores (CPU mode)")
    p.add_argument("--gpu-batch-atoms", type=int, default=1500, help="atoms per batch (GPU mode)")
    p.add_argument("--output", type=Path, default=None,
                   help="JSON path (default results/scaling.json, results/scaling_gpu.json with --gpu)")
    p.add_argument("--gpu-worker", choices=["none", "bf16"], help=argparse.SUPPRESS)  # one GPU run, JSON to stdout
    args = p.parse_args(argv)
    if args.config is None:
        args.config = str(ROOT / "configs" / ("air_mptrj.yaml" if args.gpu or args.gpu_worker else "demo.yaml"))
    if args.frames is None:
        args.frames = 600 if args.gpu or args.gpu_worker else 240
    if args.output is None:
        args.output = HERE / "results" / ("scaling_gpu.json" if args.gpu else "scaling.json")
    return args


def header() -> dict:
    return common.header()


# ------------------------------------------------------------------------------------------ one run


@dataclasses.dataclass
class Setup:
    """What every run shares: config, frames, one padded shape, and the initial weights (host arrays)."""

    config: object
    source: object
    budgets: list
    params: object
    stats: object


def make_setup(config, frames) -> Setup:
    from dpa4_jax.variables import init_variables
    from dpa4_jax.data.store import InMemoryFrames
    from dpa4_jax.train.data import Batcher, epoch_steps

    t, m = config.training, config.model
    source = InMemoryFrames(frames, m.rcut, workers=0)
    # Every sub-batch of the epoch (however grouped into steps) fits one padded shape: one compilation per
    # mesh and number of sub-batches, and the same per-device work in every run.
    every_sub_batch = epoch_steps(source.n_atoms, t.batch_atoms, 1, t.seed, 0)
    budgets = Batcher.planned(source.n_atoms, source.n_edges, every_sub_batch, n_budgets=1).budgets
    variables = init_variables(m, seed=t.seed, dtype=t.dtype)
    # Filled residual projections: every path of the model carries gradient (as in train_step.py).
    return Setup(config, source, budgets, fill_zero_weights(variables["params"]), variables["stats"])


def full_steps(setup: Setup, sub_batches: int, count: int) -> list[tuple]:
    """The first ``count`` steps of epoch 0 with ``sub_batches`` sub-batches each, never the epoch's last
    (the only one that may hold a short or a padding-only sub-batch)."""
    from dpa4_jax.train.data import epoch_steps

    t = setup.config.training
    steps = epoch_steps(setup.source.n_atoms, t.batch_atoms, sub_batches, t.seed, 0)[:-1][:count]
    if len(steps) < count:
        raise ValueError(f"--frames: {len(setup.source)} frames give {len(steps)} full steps of {sub_batches} "
                         f"sub-batches of {t.batch_atoms} atoms, fewer than the {count} needed")
    return steps


def run(setup: Setup, devices: int, sub_batches: int, n_steps: int) -> dict:
    """``n_steps + 1`` training steps on the first ``devices`` devices, from the initial weights."""
    import jax
    import numpy as np

    from dpa4_jax.train import distributed
    from dpa4_jax.train.data import Batcher
    from dpa4_jax.train.pipeline import build_batch
    from dpa4_jax.train.step import init_state, training_functions

    config, source, m = setup.config, setup.source, setup.config.model
    mesh = distributed.data_mesh(jax.devices()[:devices])
    _, tx, _, step = training_functions(config, mesh)
    compiled_before = step._cache_size()
    steps = full_steps(setup, sub_batches, n_steps + 1)
    batcher = Batcher(source.n_atoms, source.n_edges, setup.budgets)
    local = distributed.local_sub_batches(sub_batches, mesh)
    host = [build_batch(source, batcher.spec(s, local), m.type_map, m.rcut) for s in steps]
    state, stats = distributed.replicate((init_state(setup.params, tx), setup.stats), mesh)

    tick = time.perf_counter()
    state, metrics = step(state, stats, distributed.global_batch(host[0], mesh))
    losses = [metrics["loss"]]
    jax.block_until_ready(state)
    first = time.perf_counter() - tick
    tick = time.perf_counter()
    for batch in host[1:]:
        state, metrics = step(state, stats, distributed.global_batch(batch, mesh))
        losses.append(metrics["loss"])
    jax.block_until_ready(state)
    wall = time.perf_counter() - tick

    losses = [float(x) for x in distributed.to_host(losses)]
    frames = sum(len(f) for s in steps[1:] for f in s)
    atoms = sum(int(source.n_atoms[f].sum()) for s in steps[1:] for f in s)
    return {"devices": devices, "sub_batches": sub_batches, "sub_batches_per_device": sub_batches // devices,
            "frames_per_step": frames / n_steps, "atoms_per_step": atoms / n_steps,
            "padded_shape": dataclasses.asdict(setup.budgets[0]), "first_call_s": first, "timed_steps": n_steps,
            "wall_s": wall, "steps_per_s": n_steps / wall, "frames_per_s": frames / wall, "atoms_per_s": atoms / wall,
            "new_compilations": int(step._cache_size() - compiled_before),
            "compilations_of_this_step_fn": int(step._cache_size()),
            "losses": losses, "finite_losses": bool(np.all(np.isfinite(losses)))}


# ------------------------------------------------------------------------------------------ CPU


def cpu_main(args) -> dict:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={max(DEVICE_COUNTS)}").strip()
    threads = set_threads(args.threads)
    import jax

    from dpa4_jax.data import make_emt_dataset
    from workloads import EPOCH_MODEL, train_config

    if len(jax.devices()) < max(DEVICE_COUNTS):
        sys.exit(f"scaling.py: jax sees {jax.devices()}, not {max(DEVICE_COUNTS)} devices "
                 f"(XLA_FLAGS={os.environ['XLA_FLAGS']!r}; was jax imported before this script set it?)")
    config = train_config(args.config, dtype="float32", mixed_precision="none")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, **EPOCH_MODEL))
    print(f"jax {jax.__version__}, {len(jax.devices())} devices; {args.frames} EMT frames; tiny model {EPOCH_MODEL}")
    print(f"NOTE: {EMULATED}", flush=True)
    setup = make_setup(config, make_emt_dataset(args.frames, seed=0))

    runs = {"weak": [], "strong": []}
    for devices in DEVICE_COUNTS:
        for kind, sub_batches in (("weak", devices), ("strong", STRONG_SUB_BATCHES)):
            r = run(setup, devices, sub_batches, args.steps)
            runs[kind].append(r)
            print(f"  {kind:6s} {devices} device(s), {sub_batches} sub-batch(es): "
                  f"first call {r['first_call_s']:6.1f} s, "
                  f"{r['steps_per_s']:6.2f} steps/s, {r['frames_per_s']:7.1f} frames/s, "
                  f"{r['new_compilations']} new compilation(s), loss {r['losses'][0]:.6f}", flush=True)
    info = dict(header(), mode="cpu", note=EMULATED, threads=threads, config=args.config, model=EPOCH_MODEL,
                frames=args.frames, batch_atoms=config.training.batch_atoms, dtype="float32",
                scaling={"weak": "one sub-batch of ~batch_atoms atoms per device (global batch grows)",
                         "strong": f"fixed global batch of {STRONG_SUB_BATCHES} sub-batches split over the devices"},
                runs=runs, equal_losses=loss_agreement(runs))
    print_cpu(info)
    return info


def loss_agreement(runs: dict) -> dict:
    """Strong scaling: the loss of every step on 2 and 4 devices against 1 device (same batches, same start);
    weak on 4 devices against strong on 4 (the same global batch and program)."""
    import numpy as np

    strong = {r["devices"]: np.array(r["losses"]) for r in runs["strong"]}
    one = strong[1]
    rel = {d: float(np.max(np.abs(strong[d] - one) / np.abs(one))) for d in strong}
    weak_4 = next(np.array(r["losses"]) for r in runs["weak"] if r["devices"] == max(DEVICE_COUNTS))
    return {"fixed_global_batch_max_rel_diff_vs_1_device": rel,
            "fixed_global_batch_first_step_loss": {d: float(v[0]) for d, v in strong.items()},
            "rtol": LOSS_RTOL, "equal_within_rtol": all(v <= LOSS_RTOL for v in rel.values()),
            "weak_equals_strong_on_4_devices": bool(np.array_equal(weak_4, strong[max(DEVICE_COUNTS)]))}


def print_cpu(info: dict):
    print_table(f"Training step, tiny model, float32 ({info['frames']} EMT frames, batch_atoms {info['batch_atoms']})",
                ["scaling", "devices", "sub-b.", "/dev", "frames/step", "|", "1st call", "steps/s", "frames/s",
                 "new comp.", "|", "loss, step 0"],
                [[kind, r["devices"], r["sub_batches"], r["sub_batches_per_device"], f"{r['frames_per_step']:.1f}", "|",
                  f"{r['first_call_s']:.1f}s", f"{r['steps_per_s']:.2f}", f"{r['frames_per_s']:.1f}",
                  r["new_compilations"], "|", f"{r['losses'][0]:.6f}"]
                 for kind in ("weak", "strong") for r in info["runs"][kind]])
    e = info["equal_losses"]
    diffs = ", ".join(f"{d} devices {v:.1e}" for d, v in e["fixed_global_batch_max_rel_diff_vs_1_device"].items()
                      if d > 1)
    print(f"fixed global batch, largest relative loss difference over {len(info['runs']['strong'][0]['losses'])} "
          f"steps vs 1 device: {diffs} ({'within' if e['equal_within_rtol'] else 'OUTSIDE'} rtol {e['rtol']:g}); "
          f"weak = strong on 4 devices: {e['weak_equals_strong_on_4_devices']}")
    print(f"NOTE: {info['note']}")


def plot_cpu(info: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for kind, marker in (("weak", "o"), ("strong", "s")):
        rs = info["runs"][kind]
        label = {"weak": "weak: 1 sub-batch / device",
                 "strong": f"strong: {STRONG_SUB_BATCHES} sub-batches in all"}[kind]
        axes[0].plot([r["devices"] for r in rs], [r["steps_per_s"] for r in rs], marker=marker, label=label)
        axes[1].plot([r["devices"] for r in rs], [r["frames_per_s"] for r in rs], marker=marker, label=label)
    for r, style in zip(info["runs"]["strong"], ("-o", "--s", ":^")):
        axes[2].plot(r["losses"], style, ms=5, mfc="none", label=f"{r['devices']} device(s)")
    for ax, ylabel in zip(axes, ("steps/s", "frames/s", "loss (fixed global batch)")):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[:2]:
        ax.set_xlabel("emulated CPU devices")
        ax.set_xticks(DEVICE_COUNTS)
    axes[2].set_xlabel("step")
    fig.suptitle("Emulated CPU devices share the same cores: code path (equal losses), not speed", fontsize=10)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------ GPU


def gpu_run(config, frames, batch_atoms: int, n_steps: int) -> dict:
    """One precision on one device: compile (ahead of time), then ``n_steps`` timed steps on batches of
    >= ``batch_atoms`` atoms, with the device's peak memory."""
    import jax

    config = dataclasses.replace(config, training=dataclasses.replace(config.training, batch_atoms=batch_atoms))
    setup = make_setup(config, frames)
    device = jax.devices()[0]
    r = run(setup, 1, 1, n_steps)
    stats = device.memory_stats() or {}  # None on CPU
    r.update(peak_device_memory_gib=stats.get("peak_bytes_in_use", float("nan")) / 2**30,
             device_memory_limit_gib=stats.get("bytes_limit", float("nan")) / 2**30,
             mixed_precision=config.training.mixed_precision,
             parameters=int(sum(x.size for x in jax.tree.leaves(setup.params))))
    return r


def gpu_worker(args):
    """``--gpu-worker PRECISION``: one run, its JSON on the last line of stdout."""
    import jax

    from dpa4_jax.data import read_frames
    from dpa4_jax.data.synthetic import write_synthetic_mptrj
    from workloads import train_config

    if jax.devices()[0].platform != "gpu":
        sys.exit(f"scaling.py --gpu needs a GPU, but jax {jax.__version__} sees only {jax.devices()} "
                 f"(JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r}); install jax with CUDA (pip install "
                 f"'jax[cuda12]') on a GPU machine, or run without --gpu for the emulated CPU devices")
    config = train_config(args.config, dtype="float32", mixed_precision=args.gpu_worker)
    with tempfile.TemporaryDirectory() as tmp:
        frames = list(read_frames(write_synthetic_mptrj(Path(tmp) / "mptrj.json", args.frames, seed=0)))
    print(json.dumps(gpu_run(config, frames, args.gpu_batch_atoms, args.steps)))


def gpu_main(args) -> dict:
    results = {}
    for precision in ("none", "bf16"):  # each in its own process: the device's peak memory is its own
        cmd = [sys.executable, __file__, "--gpu-worker", precision, "--config", args.config,
               "--frames", str(args.frames), "--steps", str(args.steps), "--gpu-batch-atoms", str(args.gpu_batch_atoms)]
        print("  $", " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        if proc.returncode:
            sys.exit(f"scaling.py --gpu: the {precision} run failed (exit {proc.returncode}); see its message above")
        results["float32" if precision == "none" else "bf16"] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {precision:5s}: first call {r['first_call_s']:.1f} s, {r['steps_per_s']:.2f} steps/s, "
              f"{r['frames_per_s']:.1f} frames/s, {r['atoms_per_s']:.0f} atoms/s, "
              f"peak {r['peak_device_memory_gib']:.2f} GiB", flush=True)
    f32, bf16 = results["float32"], results["bf16"]
    info = dict(header(), mode="gpu", config=args.config, frames=args.frames, results=results,
                bf16_speedup=bf16["steps_per_s"] / f32["steps_per_s"],
                bf16_memory_ratio=bf16["peak_device_memory_gib"] / f32["peak_device_memory_gib"],
                first_step_loss_rel_diff=abs(bf16["losses"][0] - f32["losses"][0]) / abs(f32["losses"][0]))
    print(f"bf16 vs float32: {info['bf16_speedup']:.2f}x the steps/s, {info['bf16_memory_ratio']:.2f}x the peak "
          f"memory; first-step loss differs by {info['first_step_loss_rel_diff']:.1e} (relative)")
    return info


def main(argv=None):
    args = parse_args(argv)
    if args.gpu_worker:
        return gpu_worker(args)
    info = gpu_main(args) if args.gpu else cpu_main(args)
    out = Path(args.output)
    png = None if args.gpu else plot_cpu(info, out.with_suffix(".png"))
    if png:
        info["plot"] = str(png)
    write_json(info, out, png)


if __name__ == "__main__":
    main()
