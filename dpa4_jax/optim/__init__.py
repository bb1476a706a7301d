"""Optimiser and learning-rate schedule of DPA4 as optax transforms.

* ``hybrid_muon`` - HybridMuon (Muon + Adam/AdamW routing, Magma-lite), paper S-2.3/S-2.4.
* ``route``       - the static per-tensor routing HybridMuon uses.
* ``wsd_schedule`` - warmup-stable-decay learning rate, paper S-2.2.
"""

from dpa4_jax.optim.hybrid_muon import (
    ADAM,
    ADAMW,
    MUON,
    HybridMuonState,
    effective_shape,
    hybrid_muon,
    matrix_view,
    route,
    route_leaf,
)
from dpa4_jax.optim.schedule import PAPER_WSD, wsd_phases, wsd_schedule

__all__ = [
    "ADAM",
    "ADAMW",
    "MUON",
    "HybridMuonState",
    "PAPER_WSD",
    "effective_shape",
    "hybrid_muon",
    "matrix_view",
    "route",
    "route_leaf",
    "wsd_phases",
    "wsd_schedule",
]
