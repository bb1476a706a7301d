"""Errors of a model on a fixed frame source, batched and data parallel: the validation of training runs
(both the raw and the EMA weights) and the batched evaluation of ``dpa4_jax.evaluate``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from dpa4_jax.train import distributed
from dpa4_jax.train import loss as losses
from dpa4_jax.train.data import Batcher, epoch_steps
from dpa4_jax.train.pipeline import device_batches
from dpa4_jax.train.step import make_eval_step


class Evaluator:
    """Errors of a model on a fixed frame source, batched once (its own padded shapes), data parallel
    over ``mesh``: one sub-batch of about ``batch_atoms`` atoms per device and step."""

    def __init__(self, model, source, type_map, cutoff: float, batch_atoms: int, n_budgets: int = 3,
                 mesh=None, workers: int = 0):
        self.source, self.type_map, self.cutoff, self.workers = source, tuple(type_map), cutoff, workers
        self.mesh = distributed.data_mesh() if mesh is None else mesh
        n = self.mesh.devices.size
        steps = epoch_steps(source.n_atoms, batch_atoms, n, seed=0, epoch=0) if len(source) else []
        batcher = Batcher.planned(source.n_atoms, source.n_edges, steps, n_budgets) if steps else None
        self.specs = batcher.specs(steps, distributed.local_sub_batches(n, self.mesh)) if steps else []
        self.evaluate = make_eval_step(model, self.mesh)

    def __call__(self, variables, progress: bool = False) -> dict[str, float]:
        """MAE and RMSE (:func:`dpa4_jax.train.loss.summarize`); empty without frames."""
        if not self.specs:
            return {}
        variables = distributed.replicate(variables, self.mesh)
        batches = device_batches(self.source, self.specs, self.mesh, self.type_map, self.cutoff, self.workers)
        total = None
        for batch in tqdm(batches, total=len(self.specs), desc="evaluating", disable=not progress, leave=False):
            sums = self.evaluate(variables, batch)
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        return losses.summarize(distributed.to_host(total))
