"""Time of one training step of DPA4-Air in dpa4-jax, and of the reference (DeePMD-kit 3.2.0, PyTorch) when installed.

What one step is (both sides, float32 weights, one batch of labelled periodic fcc Cu
structures, 108 atoms each, a = 3.61 A, Gaussian rattle 0.05 A, EMT labels):

    energy -> forces (and virial) by differentiating the energy -> loss of paper Eq. 43
    (20 * energy MAE per atom + 20 * mean force-error norm + 5 * virial MAE per atom)
    -> gradient in the parameters -> clip the global gradient norm at 5 -> HybridMuon
    update (Muon + Magma-lite for matrices, Adam/AdamW for the rest) -> EMA of the weights (0.999)

* dpa4-jax: ``dpa4_jax.train.step.training_functions(config, mesh)`` on a one-device mesh,
  with the ``model`` and ``optimizer`` sections of ``configs/air_mptrj.yaml``
  (``training.dtype: float32``, ``mixed_precision: none``): one ``jax.jit`` program for the
  whole step (state and batch donated). The batch is one sub-batch padded the way
  ``train.py`` pads it (``Batcher.planned``, then ``train.pipeline.build_batch``). The
  zero-initialised weights get ``0.1 * N(0, 1)`` (as in ``inference.py``): the time does not
  depend on the values.
* reference (only when DeePMD-kit's PyTorch backend imports, e.g. under /work/refvenv):
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
4 frames (432 atoms). Per batch size: the first call (dpa4-jax: trace + XLA compile + one
step; reference: its first step, which includes torch.compile of the Gram path), one
warm-up call, then ``--repeats`` timed calls, the two implementations alternating call by
call so that their ratio is measured under the same machine load.

Second part (dpa4-jax only, ``--epoch-frames``, 0 to skip): ``--epochs`` epochs of
training on a mixed-size data set (``dpa4_jax.data.make_emt_dataset``: 4-32 atom
Al/Ni/Cu/Au cells) batched and padded as ``train.py`` does on one device (``epoch_steps``,
``Batcher.planned``, ``pipeline.load_batches``), with ``configs/demo.yaml``'s
cutoff and batching (``batch_atoms`` 64, ``n_budgets`` 2; padded shapes planned from epoch 0)
and a tiny model (``EPOCH_MODEL``: shapes, not widths, decide compilations and padding):
the number of compilations of the jitted step (``step._cache_size()``) after each epoch and
the fraction of padded edge and node slots that held nothing, plus, host side only, the
padding waste and the number of padded shapes needed for other values of ``n_budgets``.

Thread settings as in ``inference.py`` (``--threads``, default 1, set before import).

Run from the repository root:

    python benchmarks/train_step.py                          # dpa4-jax only
    /work/refvenv/bin/python benchmarks/train_step.py        # with the reference and the ratio
    /work/refvenv/bin/python benchmarks/train_step.py --batch-frames 1 4 --repeats 3
    python benchmarks/train_step.py --breakdown --epoch-frames 0   # where dpa4-jax's step time goes

Writes ``benchmarks/results/train_step.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import inference  # noqa: E402  (thread settings, machine info, structures, weight filling)

LOSS_WEIGHTS = (20.0, 20.0, 5.0)  # energy, forces, virial: configs/air_mptrj.yaml and the paper's runs


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-frames", type=int, nargs="+", default=[1],
                   help="108-atom frames per batch (one comparison per value)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per batch size, after one warm-up step")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both implementations")
    p.add_argument("--config", default=str(ROOT / "configs" / "air_mptrj.yaml"),
                   help="model and optimizer sections of this YAML")
    p.add_argument("--no-reference", action="store_true", help="time dpa4-jax only")
    p.add_argument("--ref-no-gram", action="store_true",
                   help="reference HybridMuon with enable_gram=False (no torch.compile of the Gram path)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time dpa4-jax's forward (E, F, W), loss + gradient, and optimizer + EMA alone "
                        "(three more compilations)")
    p.add_argument("--epoch-frames", type=int, default=200,
                   help="frames of the mixed-size EMT set for the compilation / padding part (0: skip)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the mixed-size part")
    p.add_argument("--epoch-config", default=str(ROOT / "configs" / "demo.yaml"),
                   help="rcut and training (batch_atoms, n_budgets) of the mixed-size part (model shrunk to EPOCH_MODEL)")
    p.add_argument("--output", default=str(HERE / "results" / "train_step.json"))
    return p.parse_args()


# ------------------------------------------------------------------------------------------ data


def labelled_frames(n_frames: int, n_atoms: int = 108, seed: int = 0) -> list:
    """``n_frames`` rattled ``n_atoms``-atom fcc Cu cells with EMT energy, forces and stress (as ``Frame``)."""
    from ase.calculators.emt import EMT

    from dpa4_jax.data import Frame

    out = []
    for i, atoms in enumerate(inference.structures(n_atoms, n_frames + seed)[seed:]):
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
        atoms.calc = None
        out.append(Frame.from_atoms(atoms, energy=e, forces=f, stress=s, source=f"cu{n_atoms}:{i}"))
    return out


def train_config(path: str, **training):
    from dpa4_jax.config import load_config

    config = load_config(path, check_paths=False)
    return dataclasses.replace(config, training=dataclasses.replace(config.training, **training))


# ------------------------------------------------------------------------------------------ dpa4-jax


class JaxStep:
    """The jitted training step of dpa4-jax on one fixed padded batch (one sub-batch on a one-device mesh)."""

    def __init__(self, config, frames):
        import jax
        import numpy as np

        from dpa4_jax.calculator import init_variables
        from dpa4_jax.data.store import InMemoryFrames
        from dpa4_jax.train import distributed
        from dpa4_jax.train.data import Batcher, size_of
        from dpa4_jax.train.pipeline import build_batch
        from dpa4_jax.train.step import init_state, training_functions

        self.jax, self.distributed = jax, distributed
        self.mesh = distributed.data_mesh(jax.devices()[:1])
        self.model, self.tx, _, self.step = training_functions(config, self.mesh)
        variables = init_variables(config.model, seed=0, dtype=config.training.dtype)
        params = inference.fill_zero_weights(variables["params"])
        self.num_params = int(sum(x.size for x in jax.tree.leaves(params)))
        self.state, self.stats = distributed.replicate((init_state(params, self.tx), variables["stats"]), self.mesh)
        source = InMemoryFrames(frames, config.model.rcut, workers=0)
        steps = [(np.arange(len(frames)),)]  # one step of one sub-batch holding every frame
        spec = Batcher.planned(source.n_atoms, source.n_edges, steps, n_budgets=1).spec(steps[0], slice(None))
        # host arrays (1, ...); a fresh device copy per step (the batch is donated)
        self.batch = build_batch(source, spec, config.model.type_map, config.model.rcut)
        self.budget = spec.budget
        self.real_edges = size_of(steps[0][0], source.n_atoms, source.n_edges).n_edge

    def breakdown(self, config, repeats: int) -> dict:
        """Medians of the parts of the step, each jitted on its own: E+F+W forward, loss + parameter
        gradient, and optimizer (clip + HybridMuon) + EMA on that gradient. Costs three more compilations."""
        import jax.numpy as jnp
        import optax

        from dpa4_jax import physics
        from dpa4_jax.train import loss as losses

        jax = self.jax
        model, ema_decay = self.model, config.training.ema_decay
        variables = {"params": self.state.params, "stats": self.stats}

        def loss_fn(params, batch):
            out = physics.energy_forces_virial(model, {"params": params, "stats": self.stats}, batch)
            return losses.loss(out, batch, config.loss)[0]

        def update(grads, state):
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = jax.tree.map(lambda e, p: e + (1.0 - ema_decay) * (p - e), state.ema_params, params)
            return params, ema, opt_state

        forward = jax.jit(lambda v, b: physics.energy_forces_virial(model, v, b))
        grad = jax.jit(jax.value_and_grad(loss_fn))
        optim = jax.jit(update)
        batch = jax.tree.map(lambda x: jnp.asarray(x[0]), self.batch)  # the step's only sub-batch, un-stacked
        _, grads = grad(self.state.params, batch)
        calls = {"forward_EFW_s": lambda: forward(variables, batch), "loss_and_grad_s": lambda: grad(self.state.params, batch),
                 "optimizer_ema_s": lambda: optim(grads, self.state)}
        out = {}
        for name, fn in calls.items():
            jax.block_until_ready(fn())  # compile
            walls = []
            for _ in range(repeats):
                t = time.perf_counter()
                jax.block_until_ready(fn())
                walls.append(time.perf_counter() - t)
            out[name] = statistics.median(walls)
        return out

    def __call__(self) -> float:
        jax = self.jax
        batch = self.distributed.global_batch(self.batch, self.mesh)
        jax.block_until_ready(batch)
        t = time.perf_counter()
        self.state, metrics = self.step(self.state, self.stats, batch)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - t


# ------------------------------------------------------------------------------------------ reference


class TorchStep:
    """The reference's training step (train mode, create_graph forces, Eq. 43 loss, HybridMuon, EMA)."""

    def __init__(self, model_config, frames, gram: bool):
        import numpy as np
        import torch
        from deepmd.pt.optimizer.hybrid_muon import HybridMuonOptimizer
        from deepmd.pt_expt.train.ema import ModelEMA

        import reference
        from dpa4_jax.elements import species_indices

        self.torch = torch
        model, _ = reference.build_model(model_config)
        self.model = model.train()
        self.num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        f64 = torch.float64
        self.coord = torch.tensor(np.stack([f.positions for f in frames]), dtype=f64)
        self.atype = torch.tensor(np.stack([species_indices(f.numbers, model_config.type_map) for f in frames]),
                                  dtype=torch.long)
        self.box = torch.tensor(np.stack([f.cell.reshape(9) for f in frames]), dtype=f64)
        self.energy = torch.tensor([f.energy for f in frames], dtype=f64)
        self.forces = torch.tensor(np.stack([f.forces for f in frames]), dtype=f64)
        self.virial = torch.tensor(np.stack([f.virial.reshape(9) for f in frames]), dtype=f64)
        self.n_atoms = len(frames[0].numbers)
        self.optimizer = HybridMuonOptimizer(
            model.parameters(), lr=6e-4, momentum=0.95, weight_decay=1e-3, adam_betas=(0.9, 0.95),
            lr_adjust=0.0, lr_adjust_coeff=0.18, muon_mode="slice", named_parameters=list(model.named_parameters()),
            enable_gram=gram, flash_muon=True, magma_muon=True)
        self.ema = ModelEMA(model, decay=0.999)
        self.parts: dict[str, float] = {}

    def loss(self, out):
        """Paper Eq. 43 (as ``dpa4_jax.train.loss.loss``): every frame has all three labels."""
        torch = self.torch
        w_e, w_f, w_v = LOSS_WEIGHTS
        n = self.n_atoms
        energy = torch.mean(torch.abs(out["energy"].reshape(-1) - self.energy) / n)
        forces = torch.mean(torch.linalg.vector_norm(out["force"].reshape(self.forces.shape) - self.forces, dim=-1))
        virial = torch.mean(torch.abs(out["virial"].reshape(-1, 9) - self.virial)) / n
        return w_e * energy + w_f * forces + w_v * virial

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(self.coord, self.atype, box=self.box)
        loss = self.loss(out)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.optimizer.step()
        self.ema.update(self.model)
        t3 = time.perf_counter()
        self.parts = {"forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2}
        return t3 - t0


# ------------------------------------------------------------------------------------------ mixed-size epoch


EPOCH_MODEL = dict(channels=8, n_radial=4, lmax=1, mmax=1, n_blocks=1, mixing_layers=2)  # the shapes are what matter


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

    from dpa4_jax.calculator import init_variables
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
    host = inference.machine()
    threads = inference.set_threads(args.threads)
    logging.getLogger("torch._library").setLevel(logging.ERROR)

    import flax
    import jax
    import jaxlib
    import numpy as np
    import optax

    import reference

    skipped = "--no-reference" if args.no_reference else reference.unavailable()
    versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                "optax": optax.__version__, "numpy": np.__version__}
    if skipped is None:
        versions.update(reference.versions())
        threads.update(reference.thread_info())
    config = train_config(args.config, dtype="float32", mixed_precision="none")
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": host, "jax_devices": [str(d) for d in jax.devices()], "versions": versions,
            "threads": threads, "load_average_start": os.getloadavg(), "config": args.config,
            "step": "E -> F, W by grad -> Eq. 43 loss (20/20/5) -> param grad -> clip 5 -> HybridMuon -> EMA",
            "reference_loss": "paper Eq. 43 written in torch (the same as dpa4_jax.train.loss)",
            "reference_optimizer": {"enable_gram": not args.ref_no_gram, "flash_muon": True, "magma_muon": True},
            "reference_skipped": skipped, "repeats": args.repeats}
    print(f"jax {jax.__version__} on {info['jax_devices']}; {host['cpu']} x{host['cpu_count']}; threads {args.threads}")
    print(f"reference: {'DeePMD-kit ' + versions['deepmd-kit'] + ', torch ' + versions['torch'] if skipped is None else 'skipped (' + skipped + ')'}")

    results = []
    for n_frames in args.batch_frames:
        frames = labelled_frames(n_frames)
        impls = {"dpa4-jax": JaxStep(config, frames)}
        if skipped is None:
            impls["reference"] = TorchStep(config.model, frames, gram=not args.ref_no_gram)
        jstep = impls["dpa4-jax"]
        row = {"frames": n_frames, "atoms": 108 * n_frames, "edges": jstep.real_edges,
               "padded": dataclasses.asdict(jstep.budget), "parameters": jstep.num_params}
        walls = {k: [] for k in impls}
        parts = []
        for i in range(args.repeats + 2):  # 0: first call, 1: warm-up, then timed
            for name, fn in impls.items():
                wall = fn()
                print(f"  {n_frames} frame(s), call {i}: {name} {wall:.2f} s"
                      + (f" ({', '.join(f'{k} {v:.2f}' for k, v in fn.parts.items())})" if name == "reference" else ""),
                      flush=True)
                if i == 0:
                    row[name] = {"first_call_s": wall}
                    if name == "reference":
                        row[name]["first_call_parts"] = dict(fn.parts)
                elif i >= 2:
                    walls[name].append(wall)
                    if name == "reference":
                        parts.append(dict(fn.parts))
        for name in impls:
            med = statistics.median(walls[name])
            row[name].update(median_s=med, min_s=min(walls[name]), runs_s=walls[name])
        j = row["dpa4-jax"]
        j["compile_estimate_s"] = j["first_call_s"] - j["median_s"]
        j["compilations"] = int(jstep.step._cache_size())
        if args.breakdown:
            j["parts_s"] = jstep.breakdown(config, args.repeats)
            print("  dpa4-jax parts: " + ", ".join(f"{k} {v:.2f}" for k, v in j["parts_s"].items()), flush=True)
        if "reference" in impls:
            r = row["reference"]
            r["parameters"] = impls["reference"].num_params
            r["median_parts_s"] = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
            row["ratio_median"] = r["median_s"] / j["median_s"]
            row["ratio_min"] = r["min_s"] / j["min_s"]
        results.append(row)
        del impls

    epoch = None
    if args.epoch_frames > 0:
        print(f"mixed-size epoch: {args.epoch_frames} EMT frames, {args.epoch_config} ...", flush=True)
        epoch = epoch_part(args.epoch_config, args.epoch_frames, args.epochs)

    info.update(load_average_end=os.getloadavg(), results=results, mixed_size_epoch=epoch)
    print_tables(results, epoch)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out}")


def print_tables(results, epoch):
    with_ref = any("reference" in r for r in results)
    head = f"{'frames':>6} {'atoms':>5} {'edges':>6} | {'jax 1st call':>12} {'compile~':>8} {'median':>8} {'min':>8} {'#comp':>5}"
    if with_ref:
        head += f" | {'ref 1st':>8} {'median':>8} {'min':>8} {'fwd/bwd/opt':>17} | {'ref/jax':>7}"
    print("\nOne training step of DPA4-Air, float32, seconds (median and min of the timed steps)")
    print(head)
    print("-" * len(head))
    for r in results:
        j = r["dpa4-jax"]
        line = (f"{r['frames']:6d} {r['atoms']:5d} {r['edges']:6d} | {j['first_call_s']:12.1f} "
                f"{j['compile_estimate_s']:8.1f} {j['median_s']:8.2f} {j['min_s']:8.2f} {j['compilations']:5d}")
        if with_ref:
            f = r["reference"]
            p = f["median_parts_s"]
            line += (f" | {f['first_call_s']:8.1f} {f['median_s']:8.2f} {f['min_s']:8.2f} "
                     f"{p['forward_s']:5.1f}/{p['backward_s']:5.1f}/{p['optimizer_s']:5.1f} | {r['ratio_median']:6.2f}x")
        print(line)
    for r in results:
        if "parts_s" in r["dpa4-jax"]:
            p = r["dpa4-jax"]["parts_s"]
            print(f"dpa4-jax parts, {r['frames']} frame(s), each jitted alone: forward E+F+W {p['forward_EFW_s']:.2f} s, "
                  f"loss + param grad {p['loss_and_grad_s']:.2f} s, clip + HybridMuon + EMA {p['optimizer_ema_s']:.2f} s")
    print("compile~ = first call - median (trace + XLA compilation); #comp = step._cache_size()"
          + ("; ref/jax = ratio of the medians; opt = clip + HybridMuon + EMA" if with_ref else ""))
    if epoch:
        print(f"\nMixed-size data ({epoch['frames']} EMT frames, {epoch['atoms_min_max'][0]}-{epoch['atoms_min_max'][1]} "
              f"atoms, batch_atoms {epoch['batch_atoms']}, n_budgets {epoch['n_budgets']}, a tiny model): per epoch")
        print(f"{'epoch':>5} {'steps':>5} {'compilations':>12} {'edge waste':>10} {'node waste':>10} {'wall':>7}")
        for i, e in enumerate(epoch["epochs"]):
            print(f"{i:5d} {e['steps']:5d} {e['compilations_so_far']:12d} {100 * e['edge_waste']:9.1f}% "
                  f"{100 * e['node_waste']:9.1f}% {e['wall_s']:6.1f}s")
        print("compilations = step._cache_size() after the epoch; waste = padded slots that held nothing")
        print(f"{'n_budgets':>9} {'planned':>7} {'needed':>6} | edge waste per epoch (host side only)")
        for s in epoch["waste_vs_n_budgets"]:
            print(f"{s['n_budgets']:9d} {s['planned_shapes']:7d} {s['shapes_needed']:6d} | "
                  + "  ".join(f"{100 * w:5.1f}%" for w in s["edge_waste_per_epoch"]))

if __name__ == "__main__":
    main()
