"""The reference implementation for the benchmarks: DeePMD-kit 3.2.0's PyTorch DPA4 ("SeZM").

Builds the reference model from the same hyper-parameters as a dpa4-jax
``ModelConfig`` (float32, eval mode, no random gauge rotation), fills its
zero-initialised weights with small random values like the dpa4-jax side, saves
it as a PyTorch training checkpoint in a temporary folder and evaluates it
through DeePMD-kit's own ASE calculator ``deepmd.calculator.DP`` (which calls
``DeepPot.eval``): that is how the reference's users run it from Python.

DeePMD-kit is LGPL-3.0: this module only calls it; none of its code is copied.

Not timed: DeePMD-kit 3.2.0's own JAX port of DPA4 (``deepmd.jax.descriptor.dpa4``).
It is a descriptor only: 3.2.0 has no JAX energy model for DPA4 (no ``dpa4_ener``
fitting, no forces or virial, no ``DeepPot``/ASE path), and its JAX neighbour list
truncates at ``sel``. Timing it would mean writing our own fitting, gradient and
neighbour-list glue around it, which no user of the reference runs. Measured by
hand earlier on this machine (Air-like, plain fitting, E+F+virial, jitted):
1.9 s / 4.9 s / 15.5 s for 32 / 108 / 256 Cu atoms (see ../shared/NOTES.md).

Setup (the reference's PyTorch backend, plus dpa4-jax's dependencies: the benchmarks run each side
in a process of its own, the reference's under this venv's interpreter, ``--reference-python``,
with dpa4-jax on ``PYTHONPATH``). The CPU torch wheel is for Python 3.11; deepmd-kit 3.2.0 pins torch
2.11 for its compiled ops, which DPA4 does not use, so its op library is moved aside
and torch 2.13 is used through the pure-Python fall-backs::

    python3 -m venv /work/refvenv                      # Python 3.11
    /work/refvenv/bin/pip install torch==2.13.0        # resolves to the CPU wheel 2.13.0+cpu
    echo "torch==2.13.0+cpu" > /work/refvenv/constraints.txt
    /work/refvenv/bin/pip install deepmd-kit==3.2.0 -c /work/refvenv/constraints.txt
    /work/refvenv/bin/pip install -c /work/refvenv/constraints.txt mpich "e3nn>=0.5.9" ase "vesin[torch]"
    /work/refvenv/bin/pip install -c /work/refvenv/constraints.txt -e .   # dpa4-jax's deps (from the repo root)
    SITE=$(/work/refvenv/bin/python -c "import deepmd, os; print(os.path.dirname(deepmd.__file__))")
    mv "$SITE/lib/libdeepmd_op_pt.so" "$SITE/lib/libdeepmd_op_pt.so.disabled"
    PYTHONPATH=$PWD /work/refvenv/bin/python -c "import deepmd.pt, torch, dpa4_jax"   # check

Why each step: ``mpich`` because the wheel loads ``libmpi.so`` from it at import;
``e3nn`` because the SeZM code imports it; ``vesin[torch]`` for its neighbour list;
the op library because it was built for torch 2.11 and refuses to load under 2.13.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dpa4_jax.config import ModelConfig

FILL_STD = 0.1  # zero-initialised weights get FILL_STD * N(0, 1), as in the reference-study
FILL_SEED = 20240614
LOSS_WEIGHTS = (20.0, 20.0, 5.0)


def unavailable() -> str | None:
    """Why the reference cannot run in this environment, or None when it can."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return f"torch is not installed ({e})"
    try:
        import deepmd.calculator  # noqa: F401
        import deepmd.pt.model.model  # noqa: F401
        import deepmd.pt.train.wrapper  # noqa: F401
    except Exception as e:  # ImportError, or the op library / mpich problems described above
        return f"deepmd-kit's PyTorch backend does not import: {type(e).__name__}: {e}"
    return None


def thread_info() -> dict:
    import torch

    return {"torch_num_threads": torch.get_num_threads(), "torch_num_interop_threads": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "DP_INTRA_OP_PARALLELISM_THREADS": os.environ.get("DP_INTRA_OP_PARALLELISM_THREADS"),
            "DP_INTER_OP_PARALLELISM_THREADS": os.environ.get("DP_INTER_OP_PARALLELISM_THREADS")}


def versions() -> dict:
    import deepmd
    import torch

    return {"torch": torch.__version__, "deepmd-kit": deepmd.__version__}


def model_params(config: ModelConfig, seed: int = 1) -> dict:
    """The reference's ``model`` section for the hyper-parameters of ``config``."""
    descriptor = {
        "type": "dpa4", "rcut": config.rcut, "sel": config.sel, "channels": config.channels,
        "n_radial": config.n_radial, "radial_mlp": [config.radial_hidden],
        "lmax": config.lmax, "mmax": config.mmax, "n_blocks": config.n_blocks,
        "mixing_layers": config.mixing_layers, "n_focus": config.n_focus,
        "radial_so2_mode": "degree_channel", "radial_so2_rank": config.radial_so2_rank,
        "n_atten_head": config.n_atten_head, "ffn_blocks": config.ffn_blocks, "ffn_neurons": config.ffn_neurons,
        "env_exp": list(config.env_exp), "edge_norm": config.edge_norm, "eps": config.eps,
        "mlp_bias": config.mlp_bias,
        "random_gamma": False,  # training-time gauge augmentation: off at inference
        "use_amp": False,  # CUDA only anyway
        "precision": "float32", "seed": seed,
    }
    params = {
        "type": "dpa4", "type_map": list(config.type_map), "descriptor": descriptor,
        "fitting_net": {"type": "dpa4_ener", "neuron": [config.fitting_neurons], "precision": "float32", "seed": seed},
    }
    if config.bridging == "zbl":
        params.update(bridging_method="zbl", bridging_r_inner=config.bridging_r_inner,
                      bridging_r_outer=config.bridging_r_outer)
    return params


def build_model(config: ModelConfig, seed: int = 1, use_compile: bool = False):
    """``(model, normalized_params)``: the reference PyTorch model in eval mode, zero weights filled
    (``use_compile``: DeePMD-kit's compiled path, ``model.use_compile``)."""
    import torch
    from deepmd.pt.model.model import get_model
    from deepmd.utils.argcheck import model_args

    params = model_params(config, seed)
    if use_compile:
        params["use_compile"] = True
    params = model_args().normalize_value(params, trim_pattern="_*")
    model = get_model(params)
    generator = torch.Generator().manual_seed(FILL_SEED)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and not torch.any(p):
                p.copy_(FILL_STD * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model.eval(), params


class Reference:
    """The reference model as an ASE calculator (``deepmd.calculator.DP`` on a saved checkpoint)."""

    def __init__(self, config: ModelConfig, seed: int = 1):
        import torch
        from deepmd.pt.train.wrapper import ModelWrapper

        model, params = build_model(config, seed)
        self.num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self._tmp = tempfile.TemporaryDirectory(prefix="dpa4_ref_")
        self.checkpoint = Path(self._tmp.name) / "reference.pt"
        torch.save({"model": ModelWrapper(model, model_params=params).state_dict()}, self.checkpoint)
        self._model = model

    def calculator(self):
        """A fresh ``deepmd.calculator.DP`` (as a user would create one per run)."""
        from deepmd.calculator import DP

        return DP(model=str(self.checkpoint))

    def serialized(self) -> dict:
        """``model.serialize()``: the same weights, for ``DPA4Calculator.from_deepmd``."""
        return self._model.serialize()

    def close(self):
        self._tmp.cleanup()


class TrainStep:
    """The reference's training step (train mode, create_graph forces, Eq. 43 loss, HybridMuon, EMA) on one
    fixed batch of labelled frames (``dpa4_jax.data.Frame``, equal sizes); ``use_compile``: DeePMD-kit's
    compiled training path (``model.use_compile``, needs torch 2.11); ``device``: a torch device."""

    def __init__(self, model_config, frames, gram: bool, use_compile: bool = False, device: str = "cpu"):
        import numpy as np
        import torch
        from deepmd.pt.optimizer.hybrid_muon import HybridMuonOptimizer
        from deepmd.pt_expt.train.ema import ModelEMA

        from dpa4_jax.elements import species_indices

        self.torch = torch
        model, _ = build_model(model_config, use_compile=use_compile)
        self.model = model.to(device).train()
        self.num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        f64 = torch.float64
        tensor = lambda x, dtype=f64: torch.tensor(np.asarray(x), dtype=dtype, device=device)
        self.coord = tensor(np.stack([f.positions for f in frames]))
        self.atype = tensor(np.stack([species_indices(f.numbers, model_config.type_map) for f in frames]), torch.long)
        self.box = tensor(np.stack([f.cell.reshape(9) for f in frames]))
        self.energy = tensor([f.energy for f in frames])
        self.forces = tensor(np.stack([f.forces for f in frames]))
        self.virial = tensor(np.stack([f.virial.reshape(9) for f in frames]))
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
        w_e, w_f, w_v = LOSS_WEIGHTS  # energy, forces, virial: configs/air_mptrj.yaml and the paper's runs
        n = self.n_atoms
        energy = torch.mean(torch.abs(out["energy"].reshape(-1) - self.energy) / n)
        forces = torch.mean(torch.linalg.vector_norm(out["force"].reshape(self.forces.shape) - self.forces, dim=-1))
        virial = torch.mean(torch.abs(out["virial"].reshape(-1, 9) - self.virial)) / n
        return w_e * energy + w_f * forces + w_v * virial

    def __call__(self) -> float:
        """One step; its wall seconds (``parts``: forward, backward, optimizer + clip + EMA)."""
        sync = self.torch.cuda.synchronize if self.coord.is_cuda else (lambda: None)
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(self.coord, self.atype, box=self.box)
        loss = self.loss(out)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.optimizer.step()
        self.ema.update(self.model)
        sync()
        t3 = time.perf_counter()
        self.parts = {"forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2}
        return t3 - t0


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
