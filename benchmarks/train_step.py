"""Time of one training step of DPA4-Air in dpa4-jax, and of the reference (DeePMD-kit 3.2.0, PyTorch) when installed.

What one step is (both sides, float32 weights, one batch of labelled periodic fcc Cu
structures, 108 atoms each, a = 3.61 A, Gaussian rattle 0.05 A, EMT labels):

    energy -> forces (and virial) by differentiating the energy -> loss of paper Eq. 43
    (20 * energy MAE per atom + 20 * mean force-error norm + 5 * virial MAE per atom)
    -> gradient in the parameters -> clip the global gradient norm at 5 -> HybridMuon
    update (Muon + Magma-lite for matrices, Adam/AdamW for the rest) -> EMA of the weights (0.999)

* dpa4-jax: ``dpa4_jax.train.step.training_functions(config, mesh)`` on a one-device mesh
  (``workloads.JaxStep``),
  with the ``model`` and ``optimizer`` sections of ``configs/air_mptrj.yaml``
  (``training.dtype: float32``, ``mixed_precision: none``): one ``jax.jit`` program for the
  whole step (state and batch donated). The batch is one sub-batch padded the way
  ``train.py`` pads it (``Batcher.planned``, then ``train.pipeline.build_batch``). The
  zero-initialised weights get ``0.1 * N(0, 1)`` (``common.fill_zero_weights``): the time does not
  depend on the values.
* reference (only when DeePMD-kit's PyTorch backend imports under ``--reference-python``):
  ``reference.build_model`` (same hyper-parameters and filled weights), put in train
  mode (forces with ``create_graph=True``; ``random_gamma`` stays off as in
  ``reference.py``), the same Eq. 43 loss written in torch on its ``energy``/``force``/
  ``virial`` outputs, ``loss.backward()``, ``torch.nn.utils.clip_grad_norm_(.., 5.0)``,
  ``deepmd.pt.optimizer.hybrid_muon.HybridMuonOptimizer`` with the reference's defaults
  (lr 6e-4, momentum 0.95, betas (0.9, 0.95), weight decay 1e-3, slice mode,
  ``enable_gram=True``, ``flash_muon=True`` (a no-op on CPU), ``magma_muon=True``, parameter
  names given for its routing; ``--ref-no-gram`` turns the compiled Gram path off), and
  DeePMD-kit's own ``ModelEMA``. Its forward / backward / optimizer(+clip+EMA) times are
  reported separately. No learning-rate schedule on that side (constant lr: the
  schedule is a scalar either way). Coordinates are given in float64, as DeePMD-kit's
  data loader does.

Default: one frame (108 atoms) per batch; ``--batch-frames 1 4`` also times batches of
4 frames (432 atoms). The protocol as in ``inference.py``: each implementation in a process of
its own (``common.Side``), both pinned to the same cores, asked in turn one step each (A B A B
...). Per batch size: the first call (dpa4-jax: trace + XLA compile + one step; reference: its
first step, which includes torch.compile of the Gram path), one warm-up call, then ``--repeats``
timed calls; medians and ranges of wall and process CPU time, the ratio of the medians and the
range of the per-round ratios.

Second part (dpa4-jax only, ``--epoch-frames``, 0 to skip): ``--epochs`` epochs of
training on a mixed-size data set (``dpa4_jax.data.make_emt_dataset``: 4-32 atom
Al/Ni/Cu/Au cells) batched and padded as ``train.py`` does on one device (``epoch_steps``,
``Batcher.planned``, ``pipeline.load_batches``), with ``configs/demo.yaml``'s
cutoff and batching (``batch_atoms`` 64, ``n_budgets`` 2; padded shapes planned from epoch 0)
and a tiny model (``EPOCH_MODEL``: shapes, not widths, decide compilations and padding):
the number of compilations of the jitted step (``step._cache_size()``) after each epoch and
the fraction of padded edge and node slots that held nothing, plus, host side only, the
padding waste and the number of padded shapes needed for other values of ``n_budgets``.

Thread settings as in ``inference.py`` (``--threads``, default 1, ``common.set_threads``).

Run from the repository root:

    python benchmarks/train_step.py --no-reference           # dpa4-jax only
    python benchmarks/train_step.py --reference-python /work/refvenv/bin/python   # with the reference and the ratio
    python benchmarks/train_step.py --reference-python /work/refvenv/bin/python --batch-frames 1 4 --repeats 3
    python benchmarks/train_step.py --no-reference --breakdown --epoch-frames 0   # where dpa4-jax's step time goes

Writes ``benchmarks/results/train_step.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import time

from common import (HERE, RESULTS, Side, alternate, header, machine, print_table, serve, set_threads, spread,
                    timed_call, write_json)
from workloads import AIR_CONFIG, EPOCH_MODEL, JaxStep, labelled_frames, loss_fn, train_config

JAX, REF = "dpa4-jax", "reference"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-frames", type=int, nargs="+", default=[1],
                   help="108-atom frames per batch (one comparison per value)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per batch size, after one warm-up step")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both implementations")
    p.add_argument("--cpus", type=int, nargs="+", default=None,
                   help="cores both sides are pinned to (default: the first --threads usable ones)")
    p.add_argument("--config", default=AIR_CONFIG, help="model and optimizer sections of this YAML")
    p.add_argument("--no-reference", action="store_true", help="time dpa4-jax only")
    p.add_argument("--reference-python", default=sys.executable,
                   help="interpreter of the venv with DeePMD-kit's PyTorch backend (reference.py)")
    p.add_argument("--ref-no-gram", action="store_true",
                   help="reference HybridMuon with enable_gram=False (no torch.compile of the Gram path)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time dpa4-jax's forward (E, F, W), loss + gradient, and optimizer + EMA alone "
                        "(three more compilations)")
    p.add_argument("--epoch-frames", type=int, default=200,
                   help="frames of the mixed-size EMT set for the compilation / padding part (0: skip)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the mixed-size part")
    p.add_argument("--epoch-config", default=str(HERE.parent / "configs" / "demo.yaml"),
                   help="rcut and training (batch_atoms, n_budgets) of the mixed-size part (model shrunk to EPOCH_MODEL)")
    p.add_argument("--output", default=str(RESULTS / "train_step.json"))
    p.add_argument("--worker", choices=[JAX, REF], help=argparse.SUPPRESS)  # one side, answering common.serve
    args = p.parse_args(argv)
    args.cpus = args.cpus or sorted(os.sched_getaffinity(0))[:args.threads]
    return args


# ------------------------------------------------------------------------------------------ dpa4-jax


def breakdown(step: JaxStep, config, repeats: int) -> dict:
    """Medians of the parts of dpa4-jax's step, each jitted on its own: E+F+W forward, loss + parameter
    gradient, and optimizer (clip + HybridMuon) + EMA on that gradient. Costs three more compilations."""
    import jax
    import optax

    from dpa4_jax import physics

    model, ema_decay = step.model, config.training.ema_decay
    variables = {"params": step.state.params, "stats": step.stats}

    def update(grads, state):
        updates, opt_state = step.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: e + (1.0 - ema_decay) * (p - e), state.ema_params, params)
        return params, ema, opt_state

    forward = jax.jit(lambda v, b: physics.energy_forces_virial(model, v, b))
    grad = jax.jit(jax.value_and_grad(loss_fn(model, step.stats, config.loss)))
    optim = jax.jit(update)
    batch = step.sub_batch()
    _, grads = grad(step.state.params, batch)
    calls = {"forward_EFW_s": lambda: forward(variables, batch), "loss_and_grad_s": lambda: grad(step.state.params, batch),
             "optimizer_ema_s": lambda: optim(grads, step.state)}
    out = {}
    for name, fn in calls.items():
        jax.block_until_ready(fn())  # compile
        out[name] = statistics.median(timed_call(fn)["wall_s"] for _ in range(repeats))
    return out


# ------------------------------------------------------------------------------------------ the two sides


class Worker:
    """One side's process: a training step per batch size, one step per request."""

    def __init__(self, args):
        self.args, self.step = args, None
        self.threads = set_threads(args.threads, args.cpus)
        logging.getLogger("torch._library").setLevel(logging.ERROR)
        self.config = train_config(args.config, dtype="float32", mixed_precision="none")

    def ready(self) -> dict:
        if self.args.worker == REF:
            import reference

            skipped = reference.unavailable()
            if skipped:
                return {"skipped": skipped}
            self.threads.update(reference.thread_info())
            return {"versions": reference.versions(), "threads": self.threads}
        import jax

        return {"threads": self.threads, "jax_devices": [str(d) for d in jax.devices()]}

    def setup(self, frames: int) -> dict:
        """A fresh step on ``frames`` labelled frames; its first call (compilation) and one warm-up call."""
        batch = labelled_frames(frames)
        self.step = None  # the previous size's step freed first
        if self.args.worker == REF:
            import reference

            self.step = reference.TrainStep(self.config.model, batch, gram=not self.args.ref_no_gram)
            out = {"parameters": self.step.num_params}
        else:
            self.step = JaxStep(self.config, batch)
            out = {"edges": self.step.real_edges, "padded": dataclasses.asdict(self.step.budget),
                   "parameters": self.step.num_params}
        out["first_call_s"] = self.step()
        out["first_call_parts"] = dict(getattr(self.step, "parts", {}))
        self.step()
        return out

    def time_step(self) -> dict:
        c = time.process_time()
        wall = self.step()
        return {"wall_s": wall, "cpu_s": time.process_time() - c, "parts": dict(getattr(self.step, "parts", {}))}

    def finish(self, breakdown_repeats: int) -> dict:
        if self.args.worker == REF:
            return {}
        out = {"compilations": int(self.step.step._cache_size())}
        if breakdown_repeats:
            out["parts_s"] = breakdown(self.step, self.config, breakdown_repeats)
        return out


def worker_main(args):
    worker = Worker(args)
    serve(worker.ready(), {"setup": worker.setup, "time_step": worker.time_step, "finish": worker.finish})


def start_sides(args) -> tuple[list[Side], str | None]:
    argv = lambda name: [str(HERE / "train_step.py"), "--worker", name, "--threads", str(args.threads),
                         "--config", args.config, "--cpus", *map(str, args.cpus)] + (["--ref-no-gram"] if args.ref_no_gram else [])
    sides, skipped = [Side(JAX, argv(JAX), args.cpus)], "--no-reference" if args.no_reference else None
    if not args.no_reference:
        ref = Side(REF, argv(REF), args.cpus, python=args.reference_python)
        skipped = ref.ready.get("skipped")
        if skipped:
            ref.close()
        else:
            sides.append(ref)
    return sides, skipped


def time_batch(args, sides, n_frames: int) -> dict:
    """One batch size: setup on every side, then ``--repeats`` rounds of one step per side, alternating."""
    setup = {s.name: s.ask({"cmd": "setup", "frames": n_frames}) for s in sides}
    j = setup[JAX]
    row = {"frames": n_frames, "atoms": 108 * n_frames, "edges": j["edges"], "padded": j["padded"],
           "parameters": j["parameters"]}
    answers = alternate(sides, ({"cmd": "time_step"} for _ in range(args.repeats)))
    for s in sides:
        walls, cpus = [a["wall_s"] for a in answers[s.name]], [a["cpu_s"] for a in answers[s.name]]
        w, c = spread(walls), spread(cpus)
        row[s.name] = {"first_call_s": setup[s.name]["first_call_s"], "median_s": w["median"], "min_s": w["min"],
                       "max_s": w["max"], "cpu_median_s": c["median"], "runs_s": walls, "cpu_runs_s": cpus}
        print(f"  {n_frames} frame(s): {s.name} first call {setup[s.name]['first_call_s']:.1f} s, "
              f"steps {', '.join(f'{x:.2f}' for x in walls)} s", flush=True)
    row[JAX].update(sides[0].ask({"cmd": "finish", "breakdown_repeats": args.repeats if args.breakdown else 0}))
    row[JAX]["compile_estimate_s"] = row[JAX]["first_call_s"] - row[JAX]["median_s"]
    if REF in row:
        r = row[REF]
        r.update(parameters=setup[REF]["parameters"], first_call_parts=setup[REF]["first_call_parts"],
                 median_parts_s={k: statistics.median(a["parts"][k] for a in answers[REF])
                                 for k in answers[REF][0]["parts"]})
        row["ratio_median"] = r["median_s"] / row[JAX]["median_s"]
        row["ratio_cpu_median"] = r["cpu_median_s"] / row[JAX]["cpu_median_s"]
        row["ratio_per_round"] = spread([b["wall_s"] / a["wall_s"] for a, b in zip(answers[JAX], answers[REF])])
    return row


# ------------------------------------------------------------------------------------------ mixed-size epoch


def plan_epoch(batcher, steps, source):
    """An epoch's specs (one sub-batch per step, as train.py on one device) and the fractions of their
    padded edge and node slots that hold nothing."""
    specs = [batcher.spec(step, slice(None)) for step in steps]
    real = [(int(source.n_edges[f].sum()), int(source.n_atoms[f].sum())) for step in steps for f in step]
    padded = [(spec.budget.n_edge, spec.budget.n_node) for spec, step in zip(specs, steps) for _ in step]
    edge_waste, node_waste = (1 - sum(r[k] for r in real) / sum(p[k] for p in padded) for k in (0, 1))
    return specs, edge_waste, node_waste


def epoch_part(path: str, n_frames: int, n_epochs: int) -> dict:
    """Compilations of the jitted step and padding waste over ``n_epochs`` epochs of a mixed-size data set,
    batched and padded as ``train.py`` does on one device (budgets planned on epoch 0's steps)."""
    import jax

    from dpa4_jax.variables import init_variables
    from dpa4_jax.data import make_emt_dataset
    from dpa4_jax.data.store import InMemoryFrames
    from dpa4_jax.train import distributed
    from dpa4_jax.train.data import Batcher, epoch_steps
    from dpa4_jax.train.pipeline import load_batches
    from dpa4_jax.train.step import init_state, training_functions

    config = train_config(path, dtype="float32", mixed_precision="none")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, **EPOCH_MODEL))
    t, m = config.training, config.model
    source = InMemoryFrames(make_emt_dataset(n_frames, seed=0), m.rcut, workers=0)
    plans = [epoch_steps(source.n_atoms, t.batch_atoms, 1, t.seed, e) for e in range(n_epochs)]

    def waste(n_budgets: int) -> dict:
        """Host side only: padding per epoch and padded shapes needed, for another number of planned shapes."""
        batcher = Batcher.planned(source.n_atoms, source.n_edges, plans[0], n_budgets)
        planned = len(batcher.budgets)
        per_epoch = [plan_epoch(batcher, plan, source)[1] for plan in plans]
        return {"n_budgets": n_budgets, "planned_shapes": planned, "shapes_needed": len(batcher.budgets),
                "edge_waste_per_epoch": per_epoch}

    sweep = [waste(k) for k in (1, 2, 3, 4, 6)]

    # The real thing: n_epochs through the jitted step, exactly as train.py batches them on one device.
    mesh = distributed.data_mesh(jax.devices()[:1])
    model, tx, _, step = training_functions(config, mesh)
    variables = init_variables(m, seed=t.seed, dtype=t.dtype)
    state, stats = distributed.replicate((init_state(variables["params"], tx), variables["stats"]), mesh)
    batcher = Batcher.planned(source.n_atoms, source.n_edges, plans[0], t.n_budgets)
    epochs = []
    for plan in plans:
        start = time.perf_counter()
        specs, edge_waste, node_waste = plan_epoch(batcher, plan, source)
        for batch in load_batches(source, specs, m.type_map, m.rcut):
            state, metrics = step(state, stats, distributed.global_batch(batch, mesh))
        jax.block_until_ready(metrics)
        epochs.append({"steps": len(plan), "compilations_so_far": int(step._cache_size()), "edge_waste": edge_waste,
                       "node_waste": node_waste, "wall_s": time.perf_counter() - start})
    return {
        "config": path, "model": EPOCH_MODEL, "frames": n_frames,
        "atoms_min_max": [int(source.n_atoms.min()), int(source.n_atoms.max())],
        "batch_atoms": t.batch_atoms, "n_budgets": t.n_budgets, "epochs": epochs,
        "padded_shapes": [dataclasses.astuple(b) for b in batcher.budgets],
        "edge_waste_all": batcher.padding_waste, "waste_vs_n_budgets": sweep,
    }


# ------------------------------------------------------------------------------------------ main


def main():
    args = parse_args()
    if args.worker:
        return worker_main(args)
    host = machine()
    sides, skipped = start_sides(args)
    try:
        set_threads(args.threads, args.cpus)  # the driver waits while the sides run, then runs the epoch part
        info = header(host, sides={s.name: {"command": s.command, **s.ready} for s in sides}, config=args.config,
                      protocol="each side in its own process, pinned to the same cores "
                               f"({args.cpus}), asked in turn one step each",
                      step="E -> F, W by grad -> Eq. 43 loss (20/20/5) -> param grad -> clip 5 -> HybridMuon -> EMA",
                      reference_loss="paper Eq. 43 written in torch (the same as dpa4_jax.train.loss)",
                      reference_optimizer={"enable_gram": not args.ref_no_gram, "flash_muon": True, "magma_muon": True},
                      reference_skipped=skipped, repeats=args.repeats)
        print(f"{host['cpu']} x{host['cpu_count']}; threads {args.threads} on cores {args.cpus}")
        print("reference: " + (f"DeePMD-kit {sides[1].ready['versions']['deepmd-kit']}, torch "
                               f"{sides[1].ready['versions']['torch']}" if len(sides) > 1 else f"skipped ({skipped})"))
        results = [time_batch(args, sides, n) for n in args.batch_frames]
    finally:
        for s in sides:
            s.close()
    epoch = None
    if args.epoch_frames > 0:
        print(f"mixed-size epoch: {args.epoch_frames} EMT frames, {args.epoch_config} ...", flush=True)
        epoch = epoch_part(args.epoch_config, args.epoch_frames, args.epochs)
    info.update(load_average_end=os.getloadavg(), results=results, mixed_size_epoch=epoch)
    print_tables(results, epoch)
    write_json(info, args.output)


def print_tables(results, epoch):
    with_ref = any(REF in r for r in results)
    head = ["frames", "atoms", "edges", "|", "jax 1st call", "compile~", "median", "range", "cpu", "#comp"]
    head += ["|", "ref 1st", "median", "range", "cpu", "fwd/bwd/opt", "|", "ref/jax", "per round", "cpu"] if with_ref else []
    rows = []
    for r in results:
        j = r[JAX]
        line = [r["frames"], r["atoms"], r["edges"], "|", f"{j['first_call_s']:.1f}", f"{j['compile_estimate_s']:.1f}",
                f"{j['median_s']:.2f}", f"{j['min_s']:.2f}-{j['max_s']:.2f}", f"{j['cpu_median_s']:.2f}", j["compilations"]]
        if REF in r:
            f, p, pr = r[REF], r[REF]["median_parts_s"], r["ratio_per_round"]
            line += ["|", f"{f['first_call_s']:.1f}", f"{f['median_s']:.2f}", f"{f['min_s']:.2f}-{f['max_s']:.2f}",
                     f"{f['cpu_median_s']:.2f}", f"{p['forward_s']:.1f}/{p['backward_s']:.1f}/{p['optimizer_s']:.1f}", "|",
                     f"{r['ratio_median']:.2f}x", f"{pr['min']:.2f}-{pr['max']:.2f}", f"{r['ratio_cpu_median']:.2f}x"]
        rows.append(line)
    print_table("One training step of DPA4-Air, float32, seconds (median and range of the timed steps, median "
                "process CPU time)", head, rows,
                "compile~ = first call - median (trace + XLA compilation); #comp = step._cache_size()"
                + ("; ref/jax = ratio of the medians (per round: range of the ratios of the steps of one round; cpu: "
                   "of the CPU-time medians); opt = clip + HybridMuon + EMA" if with_ref else ""))
    for r in results:
        if "parts_s" in r[JAX]:
            p = r[JAX]["parts_s"]
            print(f"dpa4-jax parts, {r['frames']} frame(s), each jitted alone: forward E+F+W {p['forward_EFW_s']:.2f} s, "
                  f"loss + param grad {p['loss_and_grad_s']:.2f} s, clip + HybridMuon + EMA {p['optimizer_ema_s']:.2f} s")
    if epoch:
        print_table(f"Mixed-size data ({epoch['frames']} EMT frames, {epoch['atoms_min_max'][0]}-"
                    f"{epoch['atoms_min_max'][1]} atoms, batch_atoms {epoch['batch_atoms']}, n_budgets "
                    f"{epoch['n_budgets']}, a tiny model): per epoch",
                    ["epoch", "steps", "compilations", "edge waste", "node waste", "wall"],
                    [[i, e["steps"], e["compilations_so_far"], f"{100 * e['edge_waste']:.1f}%",
                      f"{100 * e['node_waste']:.1f}%", f"{e['wall_s']:.1f}s"] for i, e in enumerate(epoch["epochs"])],
                    "compilations = step._cache_size() after the epoch; waste = padded slots that held nothing")
        print_table("Other numbers of planned shapes (host side only)",
                    ["n_budgets", "planned", "needed", "|", "edge waste per epoch"],
                    [[s["n_budgets"], s["planned_shapes"], s["shapes_needed"], "|",
                      "  ".join(f"{100 * w:5.1f}%" for w in s["edge_waste_per_epoch"])] for s in epoch["waste_vs_n_budgets"]])


if __name__ == "__main__":
    main()
