"""Host-side data layer: frames, readers, statistics, demo data (NumPy/ASE only)."""

from .demo import make_emt_dataset, write_extxyz
from .frame import Frame, FrameError, stress_to_virial, virial_to_stress
from .readers import data_format, find_deepmd_systems, read_deepmd, read_extxyz, read_frames, read_mptrj, split_frames
from .statistics import fit_energy_bias, numbers_to_types, type_counts

__all__ = [
    "Frame",
    "FrameError",
    "data_format",
    "stress_to_virial",
    "virial_to_stress",
    "read_extxyz",
    "read_deepmd",
    "read_mptrj",
    "read_frames",
    "split_frames",
    "find_deepmd_systems",
    "fit_energy_bias",
    "numbers_to_types",
    "type_counts",
    "make_emt_dataset",
    "write_extxyz",
]
