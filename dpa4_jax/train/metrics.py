"""The run's metrics log: ``metrics.csv`` (one row per validation) and ``learning_curve.png``.

Each validation evaluates both the raw and the EMA weights. The unprefixed error columns are those of the
weights the saved model holds (``training.final_weights``, EMA by default); the other weights' columns carry
their name as a prefix (``raw_force_mae``, or ``ema_force_mae`` when the raw weights are saved).
"""

from __future__ import annotations

import csv
from pathlib import Path

ERRORS = ("energy_mae", "force_mae", "stress_mae", "energy_rmse", "force_rmse", "stress_rmse")
WEIGHTS = ("ema", "raw")


def other_weights(final: str) -> str:
    return WEIGHTS[1 - WEIGHTS.index(final)]


def fields(final: str = "ema") -> list[str]:
    """The columns of ``metrics.csv`` when the saved model holds the ``final`` weights."""
    return ["step", "epoch", "lr", "loss", *ERRORS, *(f"{other_weights(final)}_{e}" for e in ERRORS),
            "skipped_steps", "elapsed_s"]


FIELDS = fields()  # the default columns (EMA weights saved)


class MetricsLog:
    """Rows of ``metrics.csv`` in a work directory, and the learning curve drawn from them."""

    def __init__(self, path: Path, final: str):
        self.path, self.final, self.fields = Path(path), final, fields(final)

    def forget_after(self, step: int) -> None:
        """A run resumed at ``step`` redoes the steps after it: drop their rows (written before a crash)."""
        if self.path.exists():
            rows = list(csv.DictReader(open(self.path)))
            kept = [r for r in rows if int(r["step"]) <= step]
            if len(kept) < len(rows):
                self._write(kept, "w")

    def append(self, row: dict) -> None:
        self._write([row], "a")

    def _write(self, rows: list[dict], mode: str) -> None:
        new = mode == "w" or not self.path.exists()
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def plot(self, png: Path) -> None:
        """Validation energy and force MAE of both weights against the step (needs matplotlib; skipped
        without it)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        rows = list(csv.DictReader(open(self.path))) if self.path.exists() else []
        if not rows:
            return
        steps = [int(r["step"]) for r in rows]
        other = other_weights(self.final)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for ax, key, unit in zip(axes, ("energy_mae", "force_mae"), ("meV/atom", "meV/Å")):
            ax.plot(steps, [float(r[key]) for r in rows], "o-", label=f"{self.final} (saved model)")
            ax.plot(steps, [float(r[f"{other}_{key}"]) for r in rows], "s--", alpha=0.7, label=other)
            ax.set_xlabel("step")
            ax.set_ylabel(f"validation {key.split('_')[0]} MAE ({unit})")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)
