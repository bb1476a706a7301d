"""What the speed benchmarks measure: the structures, the filled DPA4-Air model, its jitted energy,
E+F+V and training functions, and the training step on a fixed padded batch.

Shared by ``inference.py``, ``roofline.py``, ``op_profile.py``, ``train_step.py``, ``ab.py`` and the
smaller scripts, so that they all time the same work. Imports jax only when called (after
``common.set_threads``).
"""

from __future__ import annotations

import dataclasses
import time

from common import ROOT, fill_zero_weights

AIR_CONFIG = str(ROOT / "configs" / "air_mptrj.yaml")
LATTICES = {  # name -> (ase.build.bulk arguments, atoms in the cubic cell)
    "fcc": (dict(name="Cu", crystalstructure="fcc", a=3.61), 4),
    "bcc": (dict(name="Fe", crystalstructure="bcc", a=2.87), 2),
    "rocksalt": (dict(name="NaCl", crystalstructure="rocksalt", a=5.64), 8),
}
RATTLE = 0.05  # A, Gaussian
LOSS_WEIGHTS = (20.0, 20.0, 5.0)  # energy, forces, virial: configs/air_mptrj.yaml and the paper's runs
EPOCH_MODEL = dict(channels=8, n_radial=4, lmax=1, mmax=1, n_blocks=1, mixing_layers=2)  # shapes, not widths


# ------------------------------------------------------------------------------------------ structures


def structures(n_atoms: int, count: int, lattice: str = "fcc") -> list:
    """``count`` rattled copies of the ``n_atoms`` cubic supercell of ``lattice`` (seeded, reproducible)."""
    from ase.build import bulk

    kwargs, per_cell = LATTICES[lattice]
    repeat = round((n_atoms / per_cell) ** (1 / 3))
    if per_cell * repeat**3 != n_atoms:
        raise ValueError(f"{n_atoms} atoms is no cubic {lattice} supercell ({per_cell} r^3 atoms)")
    base = bulk(**kwargs, cubic=True).repeat(repeat)
    out = []
    for i in range(count):
        atoms = base.copy()
        atoms.rattle(RATTLE, seed=1000 * n_atoms + i)
        out.append(atoms)
    return out


def fcc_cell(n_atoms: int, seed: int = 0):
    """Rattled fcc Cu of ``n_atoms = 4 a b c`` atoms, the repeats ``a <= b <= c`` as close to cubic as possible."""
    from ase.build import bulk

    if n_atoms % 4:
        raise ValueError(f"{n_atoms} atoms is no fcc supercell (4 a b c atoms)")
    cells = n_atoms // 4
    repeats = min(((a, b, cells // (a * b)) for a in range(1, cells + 1) for b in range(a, cells + 1)
                   if cells % (a * b) == 0 and b <= cells // (a * b)), key=lambda r: r[2] / r[0])
    atoms = bulk("Cu", "fcc", a=LATTICES["fcc"][0]["a"], cubic=True).repeat(repeats)
    atoms.rattle(RATTLE, seed=seed)
    return atoms


def labelled_frames(n_frames: int, n_atoms: int = 108, seed: int = 0) -> list:
    """``n_frames`` rattled ``n_atoms``-atom fcc Cu cells with EMT energy, forces and stress (as ``Frame``)."""
    from ase.calculators.emt import EMT

    from dpa4_jax.data import Frame

    out = []
    for i, atoms in enumerate(structures(n_atoms, n_frames + seed)[seed:]):
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
        atoms.calc = None
        out.append(Frame.from_atoms(atoms, energy=e, forces=f, stress=s, source=f"cu{n_atoms}:{i}"))
    return out


# ------------------------------------------------------------------------------------------ the model


def filled_model(config_path: str = AIR_CONFIG, dtype: str = "float32"):
    """``(calculator, variables)``: the model of ``config_path`` (seed 0) and its variables with the
    zero-initialised weights filled (``common.fill_zero_weights``)."""
    from dpa4_jax.calculator import DPA4Calculator

    calc = DPA4Calculator.from_config(config_path, seed=0, dtype=dtype)
    return calc, dict(calc.variables, params=fill_zero_weights(calc.params))


def model_functions(config, matmul_dtype=None):
    """The jitted forward energy ``(variables, graph) -> (G,)`` and E+F+V ``(variables, graph) -> dict``."""
    import jax

    from dpa4_jax import physics
    from dpa4_jax.model import DPA4

    model = DPA4(config, param_dtype=jax.numpy.float32, matmul_dtype=matmul_dtype)
    forward = jax.jit(lambda v, g: physics.energy(model, v, g))
    efv = jax.jit(lambda v, g: physics.energy_forces_virial(model, v, g))
    return forward, efv


def train_config(path: str, **training):
    from dpa4_jax.config import load_config

    config = load_config(path, check_paths=False)
    return dataclasses.replace(config, training=dataclasses.replace(config.training, **training))


def loss_fn(model, stats, loss_config):
    """``(params, batch) -> loss`` of paper Eq. 43 on E, F and the virial from ``physics.energy_forces_virial``."""
    from dpa4_jax import physics
    from dpa4_jax.train import loss as losses

    def loss(params, batch):
        out = physics.energy_forces_virial(model, {"params": params, "stats": stats}, batch)
        return losses.loss(out, batch, loss_config)[0]

    return loss


class JaxStep:
    """The jitted training step of dpa4-jax on one fixed padded batch (one sub-batch on a one-device mesh).

    ``training_functions(config, mesh)`` as ``train.py`` builds it; the batch padded as ``train.py``
    pads it (``Batcher.planned``, then ``train.pipeline.build_batch``); zero weights filled.
    """

    def __init__(self, config, frames):
        import jax
        import numpy as np

        from dpa4_jax.variables import init_variables
        from dpa4_jax.data.store import InMemoryFrames
        from dpa4_jax.train import distributed
        from dpa4_jax.train.data import Batcher, size_of
        from dpa4_jax.train.pipeline import build_batch
        from dpa4_jax.train.step import init_state, training_functions

        self.jax, self.distributed = jax, distributed
        self.mesh = distributed.data_mesh(jax.devices()[:1])
        self.model, self.tx, _, self.step = training_functions(config, self.mesh)
        variables = init_variables(config.model, seed=0, dtype=config.training.dtype)
        params = fill_zero_weights(variables["params"])
        self.num_params = int(sum(x.size for x in jax.tree.leaves(params)))
        self.state, self.stats = distributed.replicate((init_state(params, self.tx), variables["stats"]), self.mesh)
        source = InMemoryFrames(frames, config.model.rcut, workers=0)
        steps = [(np.arange(len(frames)),)]  # one step of one sub-batch holding every frame
        spec = Batcher.planned(source.n_atoms, source.n_edges, steps, n_budgets=1).spec(steps[0], slice(None))
        # host arrays (1, ...); a fresh device copy per step (the batch is donated)
        self.batch = build_batch(source, spec, config.model.type_map, config.model.rcut)
        self.budget = spec.budget
        self.real_edges = size_of(steps[0][0], source.n_atoms, source.n_edges).n_edge

    def sub_batch(self):
        """The step's only sub-batch, un-stacked, on the device (for functions jitted outside the step)."""
        import jax.numpy as jnp

        return self.jax.tree.map(lambda x: jnp.asarray(x[0]), self.batch)

    def __call__(self) -> float:
        jax = self.jax
        batch = self.distributed.global_batch(self.batch, self.mesh)
        jax.block_until_ready(batch)
        t = time.perf_counter()
        self.state, metrics = self.step(self.state, self.stats, batch)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - t


# ------------------------------------------------------------------------------------------ compiled cases


@dataclasses.dataclass
class Case:
    """One compiled function of the model with its arguments and XLA's costs (``common.xla_costs``)."""

    function: str  # forward, efv or train
    atoms: int
    edges: int  # real edges
    padded_edges: int
    precision: str
    compiled: object
    args: tuple
    costs: dict

    def __call__(self):
        return self.compiled(*self.args)

    def row(self) -> dict:
        return {"function": self.function, "atoms": self.atoms, "edges": self.edges,
                "padded_edges": self.padded_edges, "precision": self.precision, **self.costs}


def size_cases(config, variables, n_atoms: int, functions=("forward", "efv"), precision: str = "float32",
               matmul_dtype=None) -> list[Case]:
    """The forward energy and E+F+V (``physics.energy_forces_virial``) of the rattled ``n_atoms`` fcc Cu
    cell (``fcc_cell``), padded as the calculator pads it, compiled."""
    import jax

    from common import xla_costs
    from dpa4_jax.calculator import DPA4Calculator

    jitted = dict(zip(("forward", "efv"), model_functions(config, matmul_dtype)))
    graph = jax.device_put(DPA4Calculator(config, variables, dtype="float32").graph(fcc_cell(n_atoms)))
    out = []
    for name in functions:
        costs, compiled = xla_costs(jitted[name], variables, graph)
        out.append(Case(name, n_atoms, int(graph.n_edge[0]), int(graph.senders.shape[0]), precision, compiled,
                        (variables, graph), costs))
    return out


def train_case(config_path: str, n_atoms: int) -> Case:
    """Loss (``loss_fn``) and parameter gradient of one labelled ``n_atoms`` frame padded as ``train.py``
    pads it (``JaxStep``), float32, compiled: the training step without the optimizer (second order)."""
    import jax

    from common import xla_costs

    config = train_config(config_path, dtype="float32", mixed_precision="none")
    step = JaxStep(config, labelled_frames(1, n_atoms))
    grad = jax.jit(jax.value_and_grad(loss_fn(step.model, step.stats, config.loss)))
    args = (step.state.params, step.sub_batch())
    costs, compiled = xla_costs(grad, *args)
    return Case("train", n_atoms, int(step.real_edges), step.budget.n_edge, "float32", compiled, args, costs)
