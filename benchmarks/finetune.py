"""Fine-tuning against training from scratch: the demo model, pretrained on EMT metals, then trained on water.

1. Pretrain: ``configs/demo.yaml`` (Al/Ni/Cu/Au, rcut 4.5, 32 channels, lmax 2, 2 blocks; its generated EMT
   set) for ``--pretrain-steps`` steps, with one padded shape (``n_budgets: 1``).
2. Fine-tune: ``--init-model`` of that run on liquid water (``<shared data>/water``: data_0..2 to train,
   data_3 to validate), type map [O, H]: both elements are new to the pretrained model (their type rows start
   from the model's initialisation), the rest of the network starts from the metals; energy bias refitted.
3. From scratch: the same architecture on the same water data, with the same steps, schedule and seed.

Both water runs are validated every ``--validate-every`` steps on the first ``--val-frames`` frames of data_3
(EMA weights); energy MAE in meV/atom, force MAE per component in meV/Å. The three runs share one process:
the two water runs differ only in their start, so they share one compiled step.

    PYTHONPATH=. python benchmarks/finetune.py                  # ~15 min on a loaded 2-core machine
    PYTHONPATH=. python benchmarks/finetune.py --steps 40 --pretrain-steps 20 --validate-every 10   # smoke

Writes ``benchmarks/results/finetune.json`` and ``.png``; run directories under ``runs/finetune_bench``
(``--workdir``).
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import yaml

from common import HERE, ROOT, header, print_table, pyplot, save_figure, write_json

SHARED_DATA = Path(os.environ.get("DPA4_SHARED_DATA", ROOT.parent / "shared" / "data"))
CURVE_KEYS = ("energy_mae", "force_mae", "energy_rmse", "force_rmse")


def water_config(args, water: Path, model: dict) -> dict:
    """A water run's config mapping: ``model`` is the model section (all of it, or only the type map)."""
    return {"model": model,
            "data": {"train": [str(water / f"data_{i}") for i in range(3)], "validation": str(water / "data_3")},
            "training": {"steps": args.steps, "batch_atoms": 192, "ema_decay": 0.99, "seed": 0,
                         "validate_every": args.validate_every, "checkpoint_every": args.steps,
                         "max_val_frames": args.val_frames, "n_budgets": 1},
            "optimizer": {"lr": 1e-3, "warmup_steps": max(1, args.steps // 20), "decay_ratio": 0.65},
            "loss": {"energy": 20.0, "forces": 20.0, "virial": 5.0}}


def run(data: dict, workdir: Path) -> tuple[list[dict], float]:
    """Train ``data`` (a config mapping) in ``workdir``: the validation curve and the wall time (s)."""
    from dpa4_jax.config import parse_config
    from dpa4_jax.train.loop import fit

    start = time.perf_counter()
    fit(parse_config(data, ROOT / "configs" / "finetune_bench.yaml"), workdir, yaml.safe_dump(data, sort_keys=False),
        progress=False)
    with open(workdir / "metrics.csv") as f:
        rows = [{"step": int(r["step"]), **{k: float(r[k]) for k in CURVE_KEYS}} for r in csv.DictReader(f)]
    return rows, time.perf_counter() - start


def plot(curves: dict, png: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, unit in zip(axes, ("energy_mae", "force_mae"), ("meV/atom", "meV/Å")):
        for label, rows in curves.items():
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], "o-", label=label)
        ax.set_xlabel("step (one 64-H2O frame each)")
        ax.set_ylabel(f"validation {key.split('_')[0]} MAE ({unit})")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("water (data_3): fine-tuned from the EMT demo model vs from scratch", fontsize=10)
    return save_figure(fig, png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=120, help="steps of each water run")
    parser.add_argument("--validate-every", type=int, default=20)
    parser.add_argument("--val-frames", type=int, default=10, help="validation frames of data_3")
    parser.add_argument("--water", type=Path, default=SHARED_DATA / "water")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "finetune_bench")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "finetune.json")
    args = parser.parse_args()
    from dpa4_jax.config import apply_overrides, read_yaml
    from dpa4_jax.load import load_model
    from dpa4_jax.logs import setup_logging
    from dpa4_jax.train import finetune

    setup_logging()
    started = time.perf_counter()
    demo = apply_overrides(read_yaml(ROOT / "configs" / "demo.yaml"), [
        f"training.steps={args.pretrain_steps}", f"training.checkpoint_every={args.pretrain_steps}",
        "training.n_budgets=1",  # one compilation of the step (the demo's two padded shapes cost two)
        f"data.train={args.workdir / 'demo_data' / 'emt.extxyz'}"])
    pretrain_curve, pretrain_s = run(demo, args.workdir / "pretrain")
    pretrained = load_model(args.workdir / "pretrain").config

    tuned = finetune.adopt_init_model(water_config(args, args.water, {"type_map": ["O", "H"], "sel": 80}),
                                      args.workdir / "pretrain", "finetune")
    scratch_model = {**pretrained.to_dict(), "type_map": ["O", "H"], "sel": 80}
    curves, seconds = {}, {}
    for label, data in (("fine-tuned", tuned), ("from scratch", water_config(args, args.water, scratch_model))):
        curves[label], seconds[label] = run(data, args.workdir / label.replace(" ", "_"))

    print_table("validation energy (meV/atom) and force (meV/A) MAE", ["step"] + [f"{lab} {q}" for lab in curves
                                                                               for q in ("E MAE", "F MAE")],
                [[row["step"]] + [f"{rows[i][k]:.{d}f}" for rows in curves.values()
                                  for k, d in (("energy_mae", 2), ("force_mae", 1))]
                 for i, row in enumerate(curves["fine-tuned"])])
    result = {
        "benchmark": "finetune", **header(),
        "note": "run on a 2-core machine shared with other jobs (load average ~5-10): wall times are not "
                "comparable to an idle machine; the curves (step, error) do not depend on the load",
        "units": {"energy_mae": "meV/atom", "force_mae": "meV/A (per component)"},
        "pretrain": {"config": "configs/demo.yaml (n_budgets 1)", "steps": args.pretrain_steps, "wall_s": round(pretrain_s, 1),
                     "final_validation": pretrain_curve[-1]},
        "water": {"data": str(args.water), "train": "data_0..2 (320 frames of 64 H2O)",
                  "validation": f"data_3, first {args.val_frames} frames", "steps": args.steps,
                  "model": scratch_model, "energy_bias": "refit (O, H are new to the pretrained model)"},
        "curves": curves, "wall_s": {k: round(v, 1) for k, v in seconds.items()},
        "total_wall_s": round(time.perf_counter() - started, 1),
    }
    write_json(result, args.output, plot(curves, args.output.with_suffix(".png")))


if __name__ == "__main__":
    main()
