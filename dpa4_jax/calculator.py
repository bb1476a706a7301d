"""ASE calculator: energy, forces, stress and per-atom energies of a DPA4 model.

One jitted function per padded shape: shapes grow in steps with a capacity
margin (like nequix's ``capacity_multiplier``), so an MD run or a relaxation
compiles a few times at most; ``calc.compilations`` counts them and each one is
logged.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import jraph
import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from dpa4_jax import graph as graphs
from dpa4_jax import physics
from dpa4_jax.config import ModelConfig, load_model_config
from dpa4_jax.load import load_model
from dpa4_jax.model import DPA4
from dpa4_jax.variables import compute_dtype, init_variables

log = logging.getLogger(__name__)

CLOSE_PAIR_SETS_KEPT = 1024  # sets of close pairs already warned about (bounded: MD can meet many)
# One jitted function for all calculators: the model is static (hashed by its configuration), so equal models,
# e.g. a committee of one architecture or a checkpoint reloaded, share their compilations.
_ENERGY_FORCES_VIRIAL = jax.jit(physics.energy_forces_virial, static_argnums=0)


class DPA4Calculator(Calculator):
    """DPA4 as an ASE calculator.

    Args:
      config: the model's hyper-parameters.
      variables: ``{"params": ..., "stats": {"energy_bias": ...}}``.
      dtype: "float32" (default) or "float64".
      capacity_multiplier: padded sizes are this factor above what is needed
        when a structure outgrows them.
      min_pair_dist: atom pairs closer than this (Å) are logged as a warning, once for each
        set of such pairs (an MD run that keeps the same close pair warns once).
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, config: ModelConfig, variables: dict, dtype: str = "float32",
                 capacity_multiplier: float = 1.1, min_pair_dist: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.dtype = dtype
        param_dtype = compute_dtype(dtype)
        self.config = config
        self.model = DPA4(config, param_dtype=param_dtype)
        cast = lambda x: jnp.asarray(x, param_dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else jnp.asarray(x)
        self.params = jax.tree.map(cast, variables["params"])
        self.energy_bias = cast(variables.get("stats", {}).get("energy_bias", np.zeros(config.ntypes)))
        self.capacity_multiplier = float(capacity_multiplier)
        self.compilations = 0
        self.min_pair_dist = float(min_pair_dist)
        self._warned_close_pairs: set[tuple] = set()
        self._budget: graphs.Budget | None = None
        self._compute = functools.partial(_ENERGY_FORCES_VIRIAL, self.model)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_config(cls, config: str | Path | ModelConfig, seed: int = 0, dtype: str = "float32", **kwargs):
        """A randomly initialised model from a YAML config (its ``model`` section) or a ``ModelConfig``."""
        if not isinstance(config, ModelConfig):
            config = load_model_config(config)
        return cls(config, init_variables(config, seed, dtype), dtype=dtype, **kwargs)

    @classmethod
    def load(cls, source, dtype: str | None = None, ema: bool = True, head: str | None = None, **kwargs):
        """Any trained model :func:`dpa4_jax.load.load_model` reads: a ``train.py`` work directory (its final
        model, else its newest checkpoint's EMA weights, or the raw ones with ``ema=False``), a saved
        ``model/`` directory, or a DeePMD-kit 3.2.0 DPA4 model (``serialize()`` dict, ``.dp``/``.yaml`` file,
        ``.pt`` checkpoint; ``head``: the branch of a multi-task one). ``dtype``: default, the training dtype."""
        model = load_model(source, ema=ema, head=head)
        return cls(model.config, model.variables, dtype=dtype or model.dtype, **kwargs)

    @classmethod
    def from_deepmd(cls, source, dtype: str = "float32", head: str | None = None, **kwargs):
        """A DeePMD-kit 3.2.0 DPA4 model (``serialize()`` dict, ``.dp``/``.yaml`` file or ``.pt`` checkpoint)
        in ``dtype`` (default float32): :meth:`load`."""
        return cls.load(source, dtype=dtype, head=head, **kwargs)

    @classmethod
    def from_checkpoint(cls, workdir: str | Path, dtype: str | None = None, ema: bool = True, **kwargs):
        """A model trained by ``train.py`` (a work directory or its ``model/``): :meth:`load`."""
        return cls.load(workdir, dtype=dtype, ema=ema, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def variables(self) -> dict:
        return {"params": self.params, "stats": {"energy_bias": self.energy_bias}}

    @property
    def num_params(self) -> int:
        """Number of trainable parameters."""
        return int(sum(np.size(x) for x in jax.tree.leaves(self.params)))

    # ------------------------------------------------------------------ evaluation
    def graph(self, atoms) -> jraph.GraphsTuple:
        """The padded graph of ``atoms`` (grows the padded budget when needed)."""
        name = f"{atoms.get_chemical_formula()} ({len(atoms)} atoms)"
        if len(atoms) == 0:
            raise ValueError("cannot evaluate a structure with no atoms")
        g = graphs.atoms_graph(atoms, self.config, name=name)
        self._warn_close_pairs(atoms, g, name)
        n_node, n_edge = len(atoms) + 1, int(g.n_edge[0])
        b = self._budget
        if b is None or n_node > b.n_node or n_edge > b.n_edge:
            m = self.capacity_multiplier
            self._budget = graphs.Budget(n_node=graphs.round_up(math.ceil(n_node * m), 8),
                                         n_edge=graphs.round_up(math.ceil(max(n_edge, 1) * m), 64), n_graph=2)
            self.compilations += 1
            log.info("DPA4Calculator: compiling for up to %d atoms and %d edges (compilation %d)",
                     self._budget.n_node - 1, self._budget.n_edge, self.compilations)
        return graphs.pad(g, self._budget)

    def get_hessian(self, atoms=None, chunk_size: int = 4) -> np.ndarray:
        """``(3N, 3N)`` Hessian of the energy in the positions (eV/Å^2, float64), ``H[3i+a, 3j+b] = d^2 E /
        dx_ia dx_jb``, exact (``physics.hessian``: forward over reverse, ``chunk_size`` columns at a time)."""
        atoms = self.atoms if atoms is None else atoms
        g = self.graph(atoms)
        n = 3 * len(atoms)
        h = physics.hessian(self.model, self.variables, jax.tree.map(jnp.asarray, g), chunk_size=chunk_size,
                            n_columns=jnp.asarray(n, jnp.int32))
        return np.asarray(h, dtype=np.float64)[:n, :n]

    def _warn_close_pairs(self, atoms, g: jraph.GraphsTuple, name: str):
        """Warn about pairs closer than ``min_pair_dist``, from the edges of ``g`` (no second search)."""
        edges = (g.senders, g.receivers, g.edges["shifts"]) if self.min_pair_dist <= self.config.rcut else None
        pairs, distances = graphs.close_pairs(atoms.positions, atoms.cell.array, atoms.pbc, self.min_pair_dist,
                                              edges, name)
        key = tuple(map(tuple, pairs.tolist()))
        if key and key not in self._warned_close_pairs:
            if len(self._warned_close_pairs) >= CLOSE_PAIR_SETS_KEPT:
                self._warned_close_pairs.clear()
            self._warned_close_pairs.add(key)
            log.warning("%s: %s; such pairs lie outside any training data", name,
                        graphs.describe_close_pairs(pairs, distances, self.min_pair_dist))

    def check_state(self, atoms, tol: float = 1e-15) -> list[str]:
        """ASE's changes, and ``info`` when the total charge or spin multiplicity (``atoms.info["charge"]``,
        ``atoms.info["spin"]``) changed: models with a charge/spin embedding depend on them."""
        changes = super().check_state(atoms, tol)
        if self.atoms is not None and any(atoms.info.get(k) != self.atoms.info.get(k) for k in ("charge", "spin")):
            changes.append("info")
        return changes

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        g = self.graph(self.atoms)
        out = self._compute(self.variables, jax.tree.map(jnp.asarray, g))
        n = len(self.atoms)
        energy = float(out["energy"][0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            # Slice on the host: slicing the jax array compiles (and caches) one program per atom count.
            "energies": np.asarray(out["energies"], dtype=np.float64)[:n],
            "forces": np.asarray(out["forces"], dtype=np.float64)[:n],
        }
        if self.atoms.pbc.all():
            self.results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(out["stress"][0], dtype=np.float64))
