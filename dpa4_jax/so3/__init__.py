"""SO(3) machinery: real spherical harmonics, index layouts, edge frames, Lebedev grids."""

from dpa4_jax.so3.harmonics import spherical_harmonics
from dpa4_jax.so3.layout import MMajorLayout, degree_of_packed, packed_index
from dpa4_jax.so3.lebedev import LebedevGrid
from dpa4_jax.so3.wigner import EdgeFrame, edge_frames

__all__ = [
    "EdgeFrame",
    "LebedevGrid",
    "MMajorLayout",
    "degree_of_packed",
    "edge_frames",
    "packed_index",
    "spherical_harmonics",
]
