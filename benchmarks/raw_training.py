"""The README's first training command on raw MPtrj-layout JSON of two sizes: peak memory and time to the first step.

    python train.py --config configs/air_mptrj.yaml --set data.train=<MPtrj-layout JSON>

with ``training.steps=1``, ``training.max_val_frames`` small (the validation of an Air model on CPU would
take longer than everything else) and ``training.batch_atoms`` 150 instead of 1,500 (Air's training step on a
1,500-atom batch asks XLA:CPU for a 52 GB buffer, beyond this 24 GB machine; the data path does not depend on it)
set by ``--set``, on synthetic files in the MPtrj layout
(``dpa4_jax.data.synthetic``; written once under ``--workdir``, never into the repository). A raw source larger
than ``dpa4_jax.train.sources.PREPARE_ABOVE_BYTES`` is prepared into a frame store in the run's work directory on
first use, so memory should not grow with the number of frames. For each size it runs the command in a fresh
process and records the peak RSS of its process tree (sampled every 0.2 s: the trainer and its workers), the
time until the store is prepared, until the first step's checkpoint is written, and in all.

    python benchmarks/raw_training.py                            # 20k and 80k frames
    python benchmarks/raw_training.py --sizes 2000 8000 --config configs/demo.yaml   # a quick check

Writes ``benchmarks/results/raw_training.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
from common import machine, write_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/dpa4_raw_training"), help="data files and runs")
    p.add_argument("--sizes", type=int, nargs="+", default=[20_000, 80_000], help="frames per data file")
    p.add_argument("--config", default="configs/air_mptrj.yaml")
    p.add_argument("--max-val-frames", type=int, default=4)
    p.add_argument("--batch-atoms", type=int, default=150)
    p.add_argument("--output", type=Path, default=HERE / "results" / "raw_training.json")
    return p.parse_args(argv)


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants (0 for those that ended meanwhile)."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_training(data: Path, run: Path, args) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    command = [sys.executable, "train.py", "--config", args.config, "--workdir", str(run), "--quiet",
               "--set", f"data.train={data}", "--set", "training.steps=1",
               "--set", f"training.max_val_frames={args.max_val_frames}",
               "--set", f"training.batch_atoms={args.batch_atoms}"]
    start = time.perf_counter()
    marks: dict[str, float] = {}
    peak = 0
    with open(run.parent / f"{run.name}.log", "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, tree_rss(watched))
            now = time.perf_counter() - start
            if "prepared_s" not in marks and (run / "data" / "train" / "meta.json").is_file():
                marks["prepared_s"] = now
            if "first_step_s" not in marks and (run / "checkpoints" / "step_00000001").is_dir():
                marks["first_step_s"] = now
            time.sleep(0.2)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}); see {log.name}")
    return dict(command=" ".join(command), peak_rss_gb=round(peak / 1e9, 3),
                total_s=round(time.perf_counter() - start, 1), **{k: round(v, 1) for k, v in marks.items()})


def main(argv=None) -> None:
    args = parse_args(argv)
    from dpa4_jax.data.synthetic import write_synthetic_mptrj

    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:
        data = args.workdir / f"mptrj_{n}.json"
        if not data.exists():  # written under another name first: a killed run leaves no truncated file
            partial = data.with_suffix(".partial")
            write_synthetic_mptrj(partial, n, seed=0, progress=True)
            partial.rename(data)
        row = dict(frames=n, file_gb=round(data.stat().st_size / 1e9, 3),
                   **run_training(data, args.workdir / f"run_{n}", args))
        print(json.dumps(row), flush=True)
        rows.append(row)
    peaks = [r["peak_rss_gb"] for r in rows]
    result = dict(benchmark="raw_training", date=datetime.date.today().isoformat(), machine=machine(),
                  load_average_end=os.getloadavg(), config=args.config, runs=rows,
                  peak_rss_ratio_largest_to_smallest=round(max(peaks) / min(peaks), 3))
    write_json(result, args.output)
    print(f"peak RSS {peaks} GB: largest/smallest {result['peak_rss_ratio_largest_to_smallest']}; {args.output}")


if __name__ == "__main__":
    main()
