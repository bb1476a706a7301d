"""Configuration: frozen dataclasses parsed from YAML and validated on load.

A config file has the sections ``model``, ``data``, ``training``, ``optimizer``
and ``loss``; this module owns the parsing rules (unknown or mistyped keys and
wrong types are errors naming the key and the file) and the model section.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dpa4_jax.elements import MPTRJ_ELEMENTS, atomic_number


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


def check_ranges(section: str, obj, positive: typing.Iterable[str] = (), non_negative: typing.Iterable[str] = ()):
    """Sizes, counts and rates of a section: ``positive`` fields must be > 0 and ``non_negative`` ones >= 0
    (a ``None`` means "not set"; a tuple is checked entry by entry)."""
    for names, bad, rule in ((positive, lambda v: not v > 0, "positive"),
                             (non_negative, lambda v: not v >= 0, "non-negative")):
        for name in names:
            value = getattr(obj, name)
            entries = value if isinstance(value, tuple) else (value,)
            if any(v is not None and bad(v) for v in entries):
                raise ConfigError(f"{section}.{name}: must be {rule}, got {value}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DPA4 hyper-parameters. Defaults are DeePMD-kit 3.2.0's (which produced the paper's numbers).

    ``type_map`` lists the element symbols the model knows; MPtrj configs use
    89 elements (Z 1-94 without Po, At, Rn, Fr, Ra).
    """

    type_map: tuple[str, ...] | str = MPTRJ_ELEMENTS  # or the alias 'mptrj'
    rcut: float = 6.0
    channels: int = 64
    n_radial: int = 16
    lmax: int = 3
    mmax: int = 1
    n_blocks: int = 3
    mixing_layers: int = 4  # SO(2) layers per block
    n_focus: int = 1
    radial_so2_rank: int = 1
    n_atten_head: int = 1
    ffn_blocks: int = 1
    ffn_neurons: int = 0  # 0: auto, ceil32(8/3 * channels)
    fitting_neurons: int = 0  # 0: auto, ceil32(8/3 * channels)
    radial_hidden: int = 0  # 0: channels
    env_exp: tuple[int, int] = (7, 5)  # envelope exponents of the radial basis and of the messages
    edge_norm: bool = True
    # Biases in the equivariant layers (l = 0 only), gates and env-seed MLP; an ablation switch, off in the paper's
    # configs. The first SO(2) layer's bias is scaled to vanish at rcut (paper S-1.6, Eq. 69).
    mlp_bias: bool = False
    eps: float = 1e-7
    sel: int = 384  # expected neighbour count: sizes padding budgets, never truncates the neighbour list
    bridging: str = "none"  # "none" or "zbl" (paper Sec. 2.1)
    bridging_r_inner: float = 0.5
    bridging_r_outer: float = 0.8
    # The reference's grid options beyond the paper's configs (its water example "DPA4-Mini" uses them).
    # grid_mlp / grid_branch are per grid path [node_wise, message_node, ffn] (node-wise products are not
    # implemented: entry 0 stays off); a positive branch count wins over grid_mlp on its path.
    ffn_so3_grid: bool = False  # FFN on the SO(3) grid (Lebedev points x rolls, frames |k| <= kmax), not S2
    message_node_so3: bool = False  # SO(3)-grid product of each node's aggregated message with its features
    so3_readout: str = "none"  # read-out FFN: "none" (l = 0 only), or "glu"/"mlp" on the SO(3) grid (all degrees)
    kmax: int = 1  # frames of the SO(3) grids
    grid_mlp: tuple[bool, bool, bool] = (False, False, False)
    grid_branch: tuple[int, int, int] = (0, 0, 0)
    # Training only: a random roll of each edge frame about its bond axis at every step (the reference's
    # default). The model is gauge invariant, so it changes the energy only by round-off.
    random_gamma: bool = True
    # Options of DeePMD-kit's published DPA4 models. radial_so2_mode: "degree_channel" (A1, the paper's) or
    # "none" (the radial features scale each degree of the local features: DPA4-Nano). sandwich_norm: RMS norms
    # [before, after] the SO(2) convolution and [before, after] each FFN.
    radial_so2_mode: str = "degree_channel"
    sandwich_norm: tuple[bool, bool, bool, bool] = (False, True, True, False)
    # A frame's total charge and spin multiplicity embedded and added to the type embedding (DPA4-OMol25);
    # default_chg_spin: (charge, multiplicity) for frames that give none (None: every frame must give them).
    add_chg_spin_ebd: bool = False
    default_chg_spin: tuple[int, int] | None = None

    def __post_init__(self):
        check_ranges("model", self, positive=("rcut", "channels", "n_radial", "n_blocks", "mixing_layers", "n_focus",
                                              "ffn_blocks", "radial_so2_rank", "sel", "eps", "env_exp"),
                     non_negative=("lmax", "n_atten_head", "ffn_neurons", "fitting_neurons", "radial_hidden",
                                   "kmax", "grid_branch"))
        if isinstance(self.type_map, str):
            if self.type_map.lower() != "mptrj":
                raise ConfigError(f"model.type_map: a list of element symbols or 'mptrj', got {self.type_map!r}")
            object.__setattr__(self, "type_map", MPTRJ_ELEMENTS)
        if not self.type_map:
            raise ConfigError("model.type_map: must list at least one element")
        for symbol in self.type_map:
            try:
                atomic_number(symbol)
            except ValueError as e:
                raise ConfigError(f"model.type_map: {e}") from None
        if len(set(self.type_map)) != len(self.type_map):
            raise ConfigError("model.type_map: duplicate elements")
        if not 0 <= self.mmax <= self.lmax:
            raise ConfigError(f"model.mmax: need 0 <= mmax <= lmax, got mmax={self.mmax}, lmax={self.lmax}")
        if self.lmax > 6:
            raise ConfigError(f"model.lmax: at most 6 is supported, got {self.lmax}")
        if self.n_atten_head and self.channels % self.n_atten_head:
            raise ConfigError("model.n_atten_head: must divide model.channels")
        if self.kmax > self.lmax:
            raise ConfigError(f"model.kmax: need kmax <= lmax, got kmax={self.kmax}, lmax={self.lmax}")
        if self.so3_readout not in ("none", "glu", "mlp"):
            raise ConfigError(f"model.so3_readout: 'none', 'glu' or 'mlp', got {self.so3_readout!r}")
        if self.grid_mlp[0] or self.grid_branch[0]:
            raise ConfigError("model.grid_mlp[0], grid_branch[0]: node-wise grid products are not implemented")
        if self.radial_so2_mode not in ("degree_channel", "none"):
            raise ConfigError(f"model.radial_so2_mode: 'degree_channel' or 'none', got {self.radial_so2_mode!r}")
        if self.default_chg_spin is not None:
            if not self.add_chg_spin_ebd:
                raise ConfigError("model.default_chg_spin: set without model.add_chg_spin_ebd (it has no effect)")
            check_charge_spin(self.default_chg_spin, "model.default_chg_spin")
        if self.bridging not in ("none", "zbl"):
            raise ConfigError(f"model.bridging: 'none' or 'zbl', got {self.bridging!r}")
        if self.bridging == "zbl" and not 0 < self.bridging_r_inner < self.bridging_r_outer < self.rcut:
            raise ConfigError("model.bridging_r_inner/r_outer: need 0 < r_inner < r_outer < rcut")

    @property
    def ntypes(self) -> int:
        return len(self.type_map)

    @property
    def atomic_numbers(self) -> tuple[int, ...]:
        return tuple(atomic_number(s) for s in self.type_map)

    @property
    def hidden_ffn(self) -> int:
        return self.ffn_neurons or auto_width(self.channels)

    @property
    def hidden_fitting(self) -> int:
        return self.fitting_neurons or auto_width(self.channels)

    def charge_spin(self, charge, spin, where: str) -> tuple:
        """A structure's ``(charge, multiplicity)`` as the model reads it (None: not given). A model with the
        charge/spin embedding and no ``default_chg_spin`` needs both; given values must be whole numbers in the
        reference's tables. Errors (``ValueError``) name ``where``."""
        if not self.add_chg_spin_ebd:
            return charge, spin
        if charge is None or spin is None:
            if self.default_chg_spin is None:
                raise ValueError(f"{where}: the model embeds the total charge and spin multiplicity "
                                 "(add_chg_spin_ebd) and has no default_chg_spin: give both (ASE atoms.info['charge'] "
                                 "and ['spin'], extxyz info keys charge and spin, DeePMD charge_spin.npy)")
            charge, spin = (self.default_chg_spin[0] if charge is None else charge,
                            self.default_chg_spin[1] if spin is None else spin)
        check_charge_spin((charge, spin), where)
        return charge, spin

    def to_dict(self) -> dict:
        """The fields as a YAML/JSON-ready mapping (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# The reference's charge and spin-multiplicity tables (deepmd/utils/charge_state.py): charges -100..99,
# multiplicities 0..99.
CHARGE_RANGE, MULTIPLICITY_RANGE = (-100, 100), (0, 100)


def check_charge_spin(charge_spin, where: str) -> None:
    """``(charge, multiplicity)``: whole numbers inside the reference's tables, or a ``ConfigError`` naming
    ``where``."""
    for value, name, (low, high) in zip(charge_spin, ("charge", "spin multiplicity"), (CHARGE_RANGE,
                                                                                      MULTIPLICITY_RANGE)):
        if not (math.isfinite(float(value)) and float(value) == int(value) and low <= int(value) < high):
            raise ConfigError(f"{where}: {name} {value!r} must be a whole number in [{low}, {high})")


def auto_width(channels: int) -> int:
    """The reference's auto hidden width of GLU layers: ``8/3 * C`` rounded up to a multiple of 32."""
    return int(32 * math.ceil(8.0 * channels / 3.0 / 32.0))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the labelled structures come from.

    ``train``/``validation`` are paths (extxyz, a DeePMD npy system or tree of
    systems, or the MPtrj JSON), one or a list. Without ``validation`` a
    ``val_fraction`` of the training frames is held out. ``demo_frames > 0``
    generates the EMT demo set into ``train`` when that file does not exist.

    Every frame is checked when read (``dpa4_jax.data.read_frames``): finite
    labels and positions of the right shapes, at least one atom, no two atoms
    closer than ``min_pair_dist`` (Å). ``on_bad_frame`` says what a failing
    frame does: ``error`` stops naming the file and frame, ``skip`` drops it
    and logs a warning with the count and the first few frames.
    """

    train: tuple[str, ...] | str
    validation: tuple[str, ...] | str | None = None
    val_fraction: float = 0.05
    format: str | None = None  # extxyz, deepmd, mptrj; guessed from the path when omitted
    energy_key: str = "energy"
    forces_key: str = "forces"
    stress_key: str = "stress"
    mptrj_energy_key: str = "uncorrected_total_energy"
    max_frames: int | None = None  # read at most this many frames per path (quick experiments)
    demo_frames: int = 0
    min_pair_dist: float = 0.1  # Å; closer pairs make a frame bad (DeePMD-kit's min_pair_dist)
    on_bad_frame: str = "error"  # "error" or "skip"
    workers: int = 0  # host processes building neighbour lists and batches (0: one background thread)
    # Raw files into a frame store in the work directory on first use (dpa4_jax.train.sources): "auto" (when
    # they are larger than 64 MB in all), "always" or "never" (read into memory).
    prepare: str = "auto"

    def __post_init__(self):
        for name in ("train", "validation"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: must be in [0, 1), got {self.val_fraction}")
        check_ranges("data", self, positive=("max_frames", "min_pair_dist"), non_negative=("demo_frames", "workers"))
        if self.on_bad_frame not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_frame: 'error' or 'skip', got {self.on_bad_frame!r}")
        if self.prepare not in ("auto", "always", "never"):
            raise ConfigError(f"data.prepare: 'auto', 'always' or 'never', got {self.prepare!r}")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    steps: int = 1000
    batch_atoms: int = 1500  # K: a batch holds ceil(K / N_atoms) structures (paper S-5.2)
    seed: int = 0
    dtype: str = "float32"
    mixed_precision: str = "none"  # "none" or "bf16"
    ema_decay: float = 0.999
    final_weights: str = "ema"  # the weights the saved model holds, "ema" or "raw" (both are validated)
    grad_clip: float = 5.0  # global gradient norm; 0 disables
    validate_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    n_budgets: int = 3  # static padded shapes per epoch (each one compiles once)
    max_val_frames: int | None = None
    # Per-device batches per step: a global batch of sub_batches x ~batch_atoms atoms, split over the devices
    # (a multiple of their count; none: one per device). Fixing it keeps a run's batches when devices change.
    sub_batches: int | None = None
    on_nonfinite: str = "skip"  # a step with a NaN/inf loss or gradient: "skip" it (counted) or "stop"
    # Fine-tuning (dpa4_jax.train.finetune): the pretrained model the run starts from (train.py --init-model),
    # the energy bias ("refit": least squares on the training data; "keep": the pretrained values of the
    # elements it knows; {element: eV}: these values; whatever is not given is fitted with the rest fixed), and
    # the parameters that get no update (top-level names or paths with '/', dpa4_jax.train.freeze).
    init_model: str | None = None
    energy_bias: Any = "refit"  # a mapping is kept as sorted (element, eV) pairs: the config stays hashable
    freeze: tuple[str, ...] | str = ()

    def __post_init__(self):
        if isinstance(self.freeze, str):
            object.__setattr__(self, "freeze", (self.freeze,))
        object.__setattr__(self, "energy_bias", _energy_bias_setting(self.energy_bias, self.init_model))
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"training.dtype: 'float32' or 'float64', got {self.dtype!r}")
        if self.mixed_precision not in ("none", "bf16"):
            raise ConfigError(f"training.mixed_precision: 'none' or 'bf16', got {self.mixed_precision!r}")
        if self.final_weights not in ("ema", "raw"):
            raise ConfigError(f"training.final_weights: 'ema' or 'raw', got {self.final_weights!r}")
        if self.on_nonfinite not in ("skip", "stop"):
            raise ConfigError(f"training.on_nonfinite: 'skip' or 'stop', got {self.on_nonfinite!r}")
        check_ranges("training", self, positive=("steps", "batch_atoms", "validate_every", "checkpoint_every",
                                                 "n_budgets", "keep_checkpoints", "max_val_frames", "sub_batches"),
                     non_negative=("grad_clip",))
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"training.ema_decay: must be in [0, 1), got {self.ema_decay}")


def _energy_bias_setting(value, init_model):
    """``training.energy_bias`` checked: "refit", "keep" (needs an init model) or ``((element, eV), ...)``."""
    if isinstance(value, str):
        if value not in ("refit", "keep"):
            raise ConfigError(f"training.energy_bias: 'refit', 'keep' or a mapping {{element: eV}}, got {value!r}")
        if value == "keep" and init_model is None:
            raise ConfigError("training.energy_bias: 'keep' needs a pretrained model (training.init_model, "
                              "train.py --init-model)")
        return value
    pairs = value.items() if isinstance(value, dict) else value
    try:
        pairs = tuple(sorted((str(k), v) for k, v in pairs))
    except (TypeError, ValueError):
        raise ConfigError(f"training.energy_bias: 'refit', 'keep' or a mapping {{element: eV}}, got {value!r}") from None
    for symbol, energy in pairs:
        try:
            atomic_number(symbol)
        except ValueError as e:
            raise ConfigError(f"training.energy_bias: {e}") from None
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not math.isfinite(energy):
            raise ConfigError(f"training.energy_bias.{symbol}: expected a finite number (eV), got {energy!r}")
    return tuple((s, float(e)) for s, e in pairs)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """HybridMuon with Magma-lite and the WSD schedule (paper S-2.2-S-2.4, Eq. 71-83)."""

    type: str = "hybrid_muon"  # or "adam" (AdamW on every leaf, for comparison)
    lr: float = 6e-4
    lr_min: float = 1e-6
    warmup_steps: int = 5000
    warmup_start_factor: float = 0.2
    decay_ratio: float = 0.65
    decay_type: str = "cosine"  # cosine, inverse_linear or linear
    momentum: float = 0.95
    adam_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-3
    muon_mode: str = "slice"
    magma_lite: bool = True

    def __post_init__(self):
        if self.type not in ("hybrid_muon", "adam"):
            raise ConfigError(f"optimizer.type: 'hybrid_muon' or 'adam', got {self.type!r}")
        if self.decay_type not in ("cosine", "inverse_linear", "linear"):
            raise ConfigError(f"optimizer.decay_type: cosine, inverse_linear or linear, got {self.decay_type!r}")
        if self.muon_mode not in ("slice", "2d", "flat"):
            raise ConfigError(f"optimizer.muon_mode: slice, 2d or flat, got {self.muon_mode!r}")
        check_ranges("optimizer", self, positive=("lr", "decay_ratio"),
                     non_negative=("lr_min", "warmup_steps", "warmup_start_factor", "momentum", "adam_betas",
                                   "weight_decay"))
        for name, value in (("decay_ratio", self.decay_ratio), ("warmup_start_factor", self.warmup_start_factor)):
            if value > 1.0:
                raise ConfigError(f"optimizer.{name}: must be at most 1, got {value}")
        below_one = {"momentum": self.momentum, **{f"adam_betas[{i}]": b for i, b in enumerate(self.adam_betas)}}
        for name, value in below_one.items():
            if not value < 1.0:
                raise ConfigError(f"optimizer.{name}: must be below 1, got {value}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of paper Eq. 43: energy MAE per atom, mean force-error norm, virial MAE per atom."""

    energy: float = 20.0
    forces: float = 20.0
    virial: float = 5.0

    def __post_init__(self):
        check_ranges("loss", self, non_negative=("energy", "forces", "virial"))
        if not self.energy + self.forces + self.virial > 0:
            raise ConfigError("loss: at least one of energy, forces, virial must be positive")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig = TrainingConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()


def load_config(path: str | Path, overrides: typing.Sequence[str] = (), check_paths: bool = True) -> Config:
    """Read and validate a full config file; ``overrides`` are ``"section.key=value"`` (YAML values).

    With ``check_paths`` the data paths must exist (the demo's generated file excepted).
    """
    return parse_config(apply_overrides(read_yaml(path), overrides), path, check_paths)


def parse_config(data: dict, path: str | Path, check_paths: bool = True) -> Config:
    """Validate a config file's mapping (read from ``path``; relative data paths are looked up beside it)."""
    config = from_dict(Config, data, str(path))
    if check_paths:
        base = Path(path).resolve().parent
        for name in ("train", "validation"):
            for p in getattr(config.data, name) or ():
                if name == "train" and config.data.demo_frames > 0:
                    continue
                if not resolve_path(p, base).exists():
                    raise ConfigError(f"{path}: data.{name}: {p} does not exist")
    return config


def apply_overrides(data: dict, overrides: typing.Sequence[str]) -> dict:
    """``data`` (a config file's mapping, changed in place) with ``"section.key=value"`` items (YAML values) set."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(value)
    return data


def resolve_path(p: str, base: Path) -> Path:
    """A relative data path is looked up in the working directory, then in the config file's directory
    (``base``); a path found in neither refers to the working directory (where the demo set is generated)."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists() or not (base / path).exists():
        return path
    return base / path


# ----------------------------------------------------------------------------- parsing


def _convert(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check ``value`` against the type ``hint`` (and coerce lists to tuples, ints to floats)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(value, option, key, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(f"{where}: {key}: unexpected value {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: {key}: expected {len(args)} entries, got {len(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where, prefix=key)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}: expected true/false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}: expected a string, got {value!r}")
        return value
    if hint is Any:
        return value
    raise TypeError(f"unsupported config type {hint}")


def from_dict(cls, data: dict | None, where: str = "<dict>", prefix: str = ""):
    """Build the dataclass ``cls`` from ``data``, naming ``where`` and the key in every error."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        dotted = ", ".join(f"{prefix}.{k}" if prefix else k for k in unknown)
        raise ConfigError(f"{where}: unknown key(s) {dotted}; known keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key, where)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(f'{prefix}.{m}' if prefix else m for m in missing)}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_model_config(path: str | Path) -> ModelConfig:
    """The ``model`` section of a YAML config file."""
    return from_dict(ModelConfig, read_yaml(path).get("model"), str(path), "model")
