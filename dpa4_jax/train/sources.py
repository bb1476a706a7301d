"""A run's frame sources: a prepared store (memory-mapped, any size) or raw data files.

Raw files of up to ``PREPARE_ABOVE_BYTES`` in all are read into memory (``InMemoryFrames``); larger ones are
prepared, on first use, into a frame store inside the work directory (``<workdir>/data/train``, ``.../validation``:
streamed, with a progress bar, in worker processes) and read from it as a store given by path would be. A resumed
run reuses that store; a store whose sources, cutoff or reader settings no longer match the config is an error
naming the difference. ``data.prepare`` (``auto``, ``always``, ``never``) overrides the size rule.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import numpy as np
from ase.data import chemical_symbols

from dpa4_jax.config import Config, ConfigError, DataConfig, resolve_path
from dpa4_jax.data import data_format, make_emt_dataset, read_frames, write_extxyz
from dpa4_jax.data.store import FrameStore, InMemoryFrames, prepare
from dpa4_jax.data.validate import check_elements
from dpa4_jax.train import distributed
from dpa4_jax.train.data import Subset

log = logging.getLogger(__name__)

# Raw data above this size (all paths of data.train or data.validation together) is prepared into a store: the
# in-memory route holds every frame as Python objects (3.5 GB at 20k MPtrj frames, 6 GB at 80k), where a store
# holds the arrays on disk and a few bytes a frame in memory. MPtrj's JSON holds 13-50 kB a frame, so a set of a
# few thousand frames stays in memory.
PREPARE_ABOVE_BYTES = 64 * 2**20
STORE_WAIT_S = 5.0  # how often a process other than 0 looks for the store process 0 is preparing


def reader_keys(data: DataConfig, path: Path) -> dict:
    """The reader settings of ``data`` for the format of ``path``: label keys and the bad-frame policy."""
    fmt = data_format(path, data.format)
    keys = {"mptrj": dict(energy_key=data.mptrj_energy_key), "deepmd": {},
            "extxyz": dict(energy_key=data.energy_key, forces_key=data.forces_key, stress_key=data.stress_key)}[fmt]
    return dict(keys, format=fmt, min_pair_dist=data.min_pair_dist, on_bad_frame=data.on_bad_frame)


def open_source(paths, config: Config, base: Path, key: str, workdir: Path):
    """One frame source from ``data.<key>``'s paths (see the module's docstring)."""
    d, rcut = config.data, config.model.rcut
    resolved = [resolve_path(p, base) for p in paths]
    stores = [p for p in resolved if (p / "meta.json").is_file()]
    if stores:
        if len(resolved) > 1:
            raise ConfigError(f"data.{key}: a prepared store must be the only path (prepare several sources "
                              f"into one store), got {list(paths)}")
        source = _checked_store(FrameStore.open(stores[0]), config, key)
    elif _should_prepare(resolved, d):
        source = _checked_store(_prepared(resolved, config, workdir / "data" / key, key), config, key)
    else:
        frames = []
        for path in resolved:
            frames += itertools.islice(read_frames(path, **reader_keys(d, path)), d.max_frames)
        check_elements(frames, config.model.type_map)  # before anything compiles
        source = InMemoryFrames(frames, rcut, workers=d.workers)
    try:
        return checked_charge_spin(source, config.model, f"data.{key}")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _should_prepare(paths: list[Path], data: DataConfig) -> bool:
    if data.prepare != "auto":
        return data.prepare == "always"
    if data.max_frames is not None:  # a quick experiment on the first frames: streamed into memory
        return False
    size = sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    return size > PREPARE_ABOVE_BYTES


def _prepared(paths: list[Path], config: Config, out: Path, key: str) -> FrameStore:
    """The store of ``paths`` at ``out``: prepared now (process 0) unless a matching one is there."""
    keys = [reader_keys(config.data, p) for p in paths]
    if any(k != keys[0] for k in keys):
        raise ConfigError(f"data.{key}: paths of different formats ({sorted({k['format'] for k in keys})}) cannot "
                          "be prepared into one store; prepare them with python -m dpa4_jax.data.prepare")
    fmt = keys[0].pop("format")
    wanted = dict(cutoff=config.model.rcut, sources=[str(p.resolve()) for p in paths], format=fmt,
                  reader_keys=keys[0])
    if not (out / "meta.json").is_file():
        if distributed.is_main_process():
            why = "always" if config.data.prepare == "always" else f"auto, above {PREPARE_ABOVE_BYTES >> 20} MB"
            log.info("data.%s: preparing a frame store of %d raw file(s) in %s (data.prepare: %s; once, a "
                     "resumed run reuses it)", key, len(paths), out, why)
            prepare(paths, out, config.model.rcut, format=fmt, workers=config.data.workers or None, **keys[0])
        while not (out / "meta.json").is_file():
            time.sleep(STORE_WAIT_S)
    store = FrameStore.open(out)
    found = {name: store.meta.get(name) for name in wanted}
    if found != wanted:
        changed = [name for name in wanted if found[name] != wanted[name]]
        raise ConfigError(f"data.{key}: the store {out} was prepared with other {', '.join(changed)} "
                          f"({[found[n] for n in changed]}, now {[wanted[n] for n in changed]}); remove it to "
                          "prepare it again")
    return store


def _checked_store(store: FrameStore, config: Config, key: str) -> FrameStore:
    missing = sorted(set(chemical_symbols[z] for z in store.elements()) - set(config.model.type_map))
    if missing:  # before anything compiles
        raise ConfigError(f"data.{key}: {store.path} holds elements {missing} that model.type_map lacks")
    if abs(store.cutoff - config.model.rcut) > 1e-9:
        raise ConfigError(f"data.{key}: {store.path} counted edges at cutoff {store.cutoff} Å, the model's rcut "
                          f"is {config.model.rcut} Å; prepare it again with --cutoff {config.model.rcut}")
    return store


def checked_charge_spin(source, model, where: str):
    """``source``, once a model with the charge/spin embedding (``model``: its ``ModelConfig``) can read every
    frame's total charge and spin multiplicity (given, or its ``default_chg_spin``; whole numbers in the
    reference's tables: ``ModelConfig.charge_spin``, once per distinct pair). A ``ValueError`` names ``where``
    and the first frame that fails."""
    if model.add_chg_spin_ebd:
        values = np.nan_to_num(source.charge_spin(), nan=_NOT_GIVEN)
        pairs, first = np.unique(values, axis=0, return_index=True)
        for pair, i in zip(pairs, first):
            model.charge_spin(*(None if v == _NOT_GIVEN else v for v in pair), f"{where}: {source.name(i)}")
    return source


_NOT_GIVEN = -1e30  # stands for NaN in checked_charge_spin (NaN rows would not compare equal)


def read_data(config: Config, base: Path, workdir: Path):
    """``(train, validation)`` frame sources (generating the EMT demo set first when configured)."""
    d = config.data
    if d.demo_frames > 0:
        target = resolve_path(d.train[0], base)
        if not target.exists():
            log.info("generating %d EMT demo frames into %s", d.demo_frames, target)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_extxyz(make_emt_dataset(d.demo_frames, seed=config.training.seed), target)
    train = open_source(d.train, config, base, "train", workdir)
    if d.validation:
        val = open_source(d.validation, config, base, "validation", workdir)
    else:
        order = np.random.default_rng(config.training.seed).permutation(len(train))
        n_val = int(round(d.val_fraction * len(train)))
        train, val = Subset(train, np.sort(order[n_val:])), Subset(train, np.sort(order[:n_val]))
    if not len(train):
        raise ConfigError(f"data.train {list(d.train)}: no frames")
    if config.training.max_val_frames is not None:
        val = Subset(val, np.arange(min(len(val), config.training.max_val_frames)))
    return train, val
