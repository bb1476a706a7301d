"""Batched structure relaxation: many structures at once, each on the path of ASE's ``FIRE(FrechetCellFilter)``.

    from dpa4_jax.relax import relax
    relaxed = relax(calc, structures, fmax=0.05, max_steps=500)

``python -m dpa4_jax.relax --model RUN --input structures.extxyz --output relaxed.extxyz`` does the same from
the command line (see ``dpa4_jax.relax.__main__``).
"""

from dpa4_jax.relax.fire import FireParameters
from dpa4_jax.relax.runner import Relaxed, relax

__all__ = ["FireParameters", "Relaxed", "relax"]
