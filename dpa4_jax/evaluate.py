"""Errors of a trained model on a data set.

    python -m dpa4_jax.evaluate --checkpoint runs/demo --data demo_data/emt.extxyz

prints the MAE and RMSE of energies (meV/atom), forces (meV/A) and stresses (GPa).
"""

from __future__ import annotations

import argparse
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dpa4_jax.calculator import DPA4Calculator
from dpa4_jax.data import read_frames
from dpa4_jax.data.store import InMemoryFrames
from dpa4_jax.train import distributed
from dpa4_jax.train import loss as losses
from dpa4_jax.train.data import Batcher, epoch_steps
from dpa4_jax.train.pipeline import load_batches
from dpa4_jax.train.step import make_eval_step


class Evaluator:
    """Errors of a model on a fixed frame source, batched once (its own padded shapes), data parallel
    over ``mesh``: one sub-batch of about ``batch_atoms`` atoms per device and step."""

    def __init__(self, model, source, type_map, cutoff: float, batch_atoms: int, n_budgets: int = 3,
                 mesh=None, workers: int = 0):
        self.source, self.type_map, self.cutoff, self.workers = source, tuple(type_map), cutoff, workers
        self.mesh = distributed.data_mesh() if mesh is None else mesh
        n = self.mesh.devices.size
        self.steps = epoch_steps(source.n_atoms, batch_atoms, n, seed=0, epoch=0) if len(source) else []
        batcher = Batcher.planned(source.n_atoms, source.n_edges, self.steps, n_budgets) if self.steps else None
        local = distributed.local_sub_batches(n, self.mesh)
        self.specs = [batcher.spec(step, local) for step in self.steps]
        self.evaluate = make_eval_step(model, self.mesh)

    def __call__(self, variables, progress: bool = False) -> dict[str, float]:
        """MAE and RMSE (:func:`dpa4_jax.train.loss.summarize`); empty without frames."""
        if not self.specs:
            return {}
        variables = distributed.replicate(variables, self.mesh)
        batches = load_batches(self.source, self.specs, self.type_map, self.cutoff, workers=self.workers)
        total = None
        for batch in tqdm(batches, total=len(self.specs), desc="evaluating", disable=not progress, leave=False):
            sums = self.evaluate(variables, distributed.global_batch(batch, self.mesh))
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        return losses.summarize(distributed.to_host(total))


def evaluate(calc: DPA4Calculator, frames, batch_atoms: int = 1000, progress: bool = True) -> dict[str, float]:
    source = InMemoryFrames(frames, calc.config.rcut)
    return Evaluator(calc.model, source, calc.config.type_map, calc.config.rcut, batch_atoms)(calc.variables,
                                                                                             progress)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="work directory of train.py (or its model/ directory)")
    p.add_argument("--data", required=True, help="extxyz file, DeePMD system(s) or MPtrj JSON")
    p.add_argument("--format", default=None, help="extxyz, deepmd or mptrj (default: from the path)")
    p.add_argument("--energy-key", default=None, help="extxyz energy key, e.g. REF_energy")
    p.add_argument("--forces-key", default=None)
    p.add_argument("--stress-key", default=None)
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--batch-atoms", type=int, default=1000)
    args = p.parse_args(argv)

    calc = DPA4Calculator.from_checkpoint(args.checkpoint)
    keys = {k: v for k, v in dict(energy_key=args.energy_key, forces_key=args.forces_key,
                                   stress_key=args.stress_key).items() if v is not None}
    frames = list(itertools.islice(read_frames(args.data, format=args.format, **keys), args.max_frames))
    result = evaluate(calc, frames, args.batch_atoms)
    print(f"{args.data}: {len(frames)} frames, {sum(f.natoms for f in frames)} atoms")
    print(f"{'quantity':<10}{'MAE':>12}{'RMSE':>12}  unit")
    for key, unit in (("energy", "meV/atom"), ("force", "meV/A"), ("stress", "GPa")):
        mae, rmse = result[f"{key}_mae"], result[f"{key}_rmse"]
        if np.isnan(mae):
            print(f"{key:<10}{'-':>12}{'-':>12}  (no labels)")
        else:
            print(f"{key:<10}{mae:>12.4f}{rmse:>12.4f}  {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
