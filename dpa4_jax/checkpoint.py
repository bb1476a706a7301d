"""A run directory's files: checkpoints and the saved model, each written atomically (a temporary directory
renamed into place), so a crash never leaves a half-written one; the newest complete checkpoint is what a
restart resumes from.

Layout of a work directory::

    config.yaml                 the resolved configuration of the run
    checkpoints/step_00001000/  state.msgpack (TrainState, energy bias) + meta.json (data position, shapes)
    model/                      variables.msgpack (EMA or raw: training.final_weights) + config.yaml
    metrics.csv, learning_curve.png
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from flax import serialization

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MODEL = "model"


def atomic_dir(final: Path, write) -> None:
    """``write(folder)`` into a new folder beside ``final``, then renamed to ``final`` (replacing it): the folder
    appears whole or not at all."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save(workdir: Path, step: int, state, stats, meta: dict, keep: int = 2) -> Path:
    """Write ``checkpoints/step_XXXXXXXX`` and delete all but the ``keep`` newest."""
    final = Path(workdir) / CHECKPOINTS / f"step_{step:08d}"

    def write(tmp: Path):
        (tmp / "state.msgpack").write_bytes(serialization.to_bytes({"state": state, "stats": stats}))
        (tmp / "meta.json").write_text(json.dumps(dict(meta, step=step), indent=1))

    atomic_dir(final, write)
    for old in list_checkpoints(workdir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(workdir: Path) -> list[Path]:
    root = Path(workdir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and (p / "meta.json").is_file() and (p / "state.msgpack").is_file())


def restore_latest(workdir: Path, state_template, stats_template):
    """``(path, state, stats, meta)`` of the newest checkpoint that reads back, or None when there is none.

    A checkpoint that fails to read (a disk error, a file damaged after it was written) is reported and
    the previous one is tried.
    """
    for path in reversed(list_checkpoints(workdir)):
        try:
            return (path, *restore(path, state_template, stats_template))
        except Exception as e:  # noqa: BLE001 - msgpack, JSON and shape errors alike mean "damaged"
            log.warning("checkpoint %s is damaged (%s: %s); trying the previous one", path, type(e).__name__, e)
    return None


def restore(path: Path, state_template, stats_template):
    """``(state, stats, meta)`` of a checkpoint, shaped like the templates."""
    restored = serialization.from_bytes({"state": state_template, "stats": stats_template},
                                        (Path(path) / "state.msgpack").read_bytes())
    return restored["state"], restored["stats"], json.loads((Path(path) / "meta.json").read_text())


def load_raw(path: Path) -> dict:
    """A checkpoint's contents as nested dicts (no template needed): ``state`` fields and ``stats``."""
    return serialization.msgpack_restore((Path(path) / "state.msgpack").read_bytes())


def save_model(workdir: Path, variables: dict, config_text: str) -> Path:
    """The final model (the weights ``training.final_weights`` names, and the energy bias) with its configuration."""
    final = Path(workdir) / MODEL

    def write(tmp: Path):
        (tmp / "variables.msgpack").write_bytes(serialization.msgpack_serialize(serialization.to_state_dict(variables)))
        (tmp / "config.yaml").write_text(config_text)

    atomic_dir(final, write)
    return final


def load_model(path: Path) -> tuple[str, dict]:
    """``(config_text, variables)`` of a saved model directory."""
    path = Path(path)
    variables = serialization.msgpack_restore((path / "variables.msgpack").read_bytes())
    return (path / "config.yaml").read_text(), variables


def load_trained(path: Path, ema: bool = True) -> tuple[str, dict]:
    """``(config_text, variables)`` of a saved model directory, of a run directory's final model, or, if the
    run has not finished, of its newest checkpoint (EMA weights unless ``ema=False``)."""
    path = Path(path)
    for model in (path, path / MODEL):
        if (model / "variables.msgpack").is_file():
            return load_model(model)
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: no trained model (model/) and no checkpoint (checkpoints/)")
    raw = load_raw(found[-1])
    return (path / "config.yaml").read_text(), {"params": raw["state"]["ema_params" if ema else "params"],
                                                "stats": raw["stats"]}
