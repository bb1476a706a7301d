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
from dpa4_jax.train import loss as losses
from dpa4_jax.train.data import Batcher, GraphDataset, batch_plan, plan_budgets, prefetch
from dpa4_jax.train.step import make_eval_step


def evaluate(calc: DPA4Calculator, frames, batch_atoms: int = 1000, progress: bool = True) -> dict[str, float]:
    dataset = GraphDataset(frames, calc.config.type_map, calc.config.rcut)
    batches = batch_plan(dataset.n_atoms, batch_atoms, np.random.default_rng(0))
    batcher = Batcher(dataset, plan_budgets([dataset.size_of(b) for b in batches], 3))
    step = make_eval_step(calc.model)
    total = None
    for batch in tqdm(prefetch(batcher.make, batches), total=len(batches), desc="evaluating", disable=not progress):
        sums = step(calc.variables, jax.tree.map(jnp.asarray, batch))
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    return losses.summarize(jax.device_get(total))


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
