"""Accuracy against wall-clock time on liquid water: dpa4-jax and the reference (DeePMD-kit 3.2.0, PyTorch).

The paper's accuracy-cost claim at small scale: the same small DPA4 (``configs/water.yaml``: O/H, rcut 5,
32 channels, lmax 2, mmax 1, 2 blocks, 2 SO(2) layers, ~0.22M parameters; the size of the reference's
"DPA4-Mini" water example, whose other options (rcut 6, lmax 3, grid FFN, ...) are not used here) is
trained by each implementation on ``../shared/data/water`` (data_0..2: 320 frames of 64 H2O) for the same
wall-clock budget, and scored on data_3 (all 80 frames).

Protocol (``--budget-min``, default 20, per implementation; the two run ONE AFTER THE OTHER, each a
subprocess with ``--threads`` threads, default 2):

1. Calibration (skipped with ``--jax-steps`` / ``--ref-steps``): a short run of each side gives its
   seconds per step (between checkpoints, so compilation excluded) and its start-up time (process start to
   first step: imports, data, statistics, compilation). Steps = ``--safety`` x (budget - start-up) / (s/step),
   so that the whole WSD schedule (warm-up, stable, decay) ends inside the budget. The run is stopped by
   SIGINT (then SIGTERM, SIGKILL) when the budget is reached anyway (``stopped_by_budget`` in the JSON).
2. dpa4-jax: ``train.py --config configs/water.yaml`` with ``training.steps`` set as above, a checkpoint
   every steps / ``--points`` steps (all kept), no in-training validation (``max_val_frames=0``), warm-up
   4% of the steps (100 of the config's 2500).
3. Reference: ``dp --pt train input.json`` with the model of ``reference.model_params`` (same
   hyper-parameters; ``random_gamma`` off, as dpa4-jax has no random gauge roll), the same optimizer,
   schedule, loss, EMA, clipping, batch size and data; a checkpoint every steps / ``--points`` steps
   (``model.ckpt-N.pt`` and its EMA ``model_ema.ckpt-N.pt``); no validation data (none in training).
4. Time of a checkpoint = its file's mtime - the time the training process was launched (both sides: the
   curve includes start-up and compilation). Checkpoints after the budget are dropped.
5. Every checkpoint of both sides, EMA weights and raw weights, is scored by the SAME evaluator:
   ``dpa4_jax.evaluate.evaluate`` in float32 on all of data_3 (reference checkpoints are converted exactly
   by ``DPA4Calculator.from_deepmd``). Energy MAE in meV/atom, force MAE per component in meV/A.
   Scores are cached per checkpoint file in ``<workdir>/<side>/evaluations.json``.

Hyper-parameters shared by both sides (configs/water.yaml): HybridMuon (lr 1e-3, momentum 0.95, Adam betas
(0.9, 0.95), weight decay 1e-3, slice mode, Magma-lite, match-RMS 0.18), WSD (warm-up from 0.2 x lr,
cosine decay over the last 65% of the steps to 1e-6), gradient-norm clip 5, EMA 0.995, one 192-atom frame
per step, loss 20 x energy MAE/atom + 20 x mean force-error norm (+ 5 x virial MAE/atom; water has no
virial labels). The reference's ``ener`` loss with ``loss_func: mae``, ``f_use_norm: true`` and constant
prefactors (start = limit) is exactly that loss (its energy term is |dE|/N, its force term the mean of
|dF_i|). Differences that remain: the reference samples each frame at random (systems weighted by size),
dpa4-jax shuffles epochs; its Gram Newton-Schulz path is torch-compiled; EMA 0.995 is per step, so on the
side doing fewer steps the EMA averages over a larger share of its run (hence raw weights are scored too).

Run from the repository root with the venv that has both DeePMD-kit and dpa4-jax (see ``reference.py``):

    /work/refvenv/bin/python benchmarks/accuracy_water.py                    # 2 x 20 min + calibration, eval
    /work/refvenv/bin/python benchmarks/accuracy_water.py --budget-min 2     # quick check of the pipeline
    /work/refvenv/bin/python benchmarks/accuracy_water.py --only jax         # retrain one side
    /work/refvenv/bin/python benchmarks/accuracy_water.py --evaluate-only    # re-score / re-plot

Writes ``benchmarks/results/accuracy_water.json`` and ``.png`` (``--output``); work files in
``runs/accuracy_water/`` (``--workdir``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import HERE, ROOT, machine, pyplot, save_figure, set_threads, write_json

SIDES = ("jax", "reference")
LABELS = {"jax": "dpa4-jax", "reference": "DeePMD-kit (PyTorch)"}
WARMUP_FRACTION = 100 / 2500  # configs/water.yaml: 100 warm-up steps of 2500
DIFFERENCES = [
    "warm-up: 4% of each side's step count (configs/water.yaml: 100 of 2500) on both sides",
    "reference random_gamma (random gauge roll of the edge frames in training, its default) off: dpa4-jax has none",
    "data order: the reference draws a random frame per step (systems weighted by size); dpa4-jax shuffles epochs",
    "EMA 0.995 per step on both sides: the side with fewer steps averages over a larger share of its run",
    "reference HybridMuon: enable_gram (torch-compiled Gram Newton-Schulz) and flash_muon at their defaults",
    "no in-training validation on either side; checkpoints scored afterwards by the same evaluator",
    ("start-up: torch.compile output of the reference's Gram path is cached on disk across runs "
     "(/tmp/torchinductor_*, warm after its calibration run); dpa4-jax compiles afresh in each run"),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-min", type=float, default=20.0, help="wall-clock minutes per implementation")
    p.add_argument("--only", choices=SIDES, default=None, help="train this side only (the other is re-used)")
    p.add_argument("--evaluate-only", action="store_true", help="no training: score and plot the work dirs")
    p.add_argument("--jax-steps", type=int, default=None, help="dpa4-jax steps (default: from a calibration run)")
    p.add_argument("--ref-steps", type=int, default=None, help="reference steps (default: from a calibration run)")
    p.add_argument("--jax-calib-steps", type=int, default=60, help="steps of dpa4-jax's calibration run")
    p.add_argument("--ref-calib-steps", type=int, default=8, help="steps of the reference's calibration run")
    p.add_argument("--safety", type=float, default=0.9, help="fraction of the predicted steps that is trained")
    p.add_argument("--points", type=int, default=15, help="checkpoints (curve points) per side")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each training and of the scoring")
    p.add_argument("--config", default=str(ROOT / "configs" / "water.yaml"))
    p.add_argument("--jax-python", default=sys.executable, help="python that runs train.py")
    p.add_argument("--dp", default=str(Path(sys.executable).parent / "dp"), help="DeePMD-kit's dp command")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "accuracy_water"))
    p.add_argument("--output", default=str(HERE / "results" / "accuracy_water.json"), help="JSON (PNG beside it)")
    return p.parse_args()


# ------------------------------------------------------------------------------------------ running


def launch(cmd: list[str], workdir: Path, budget_s: float, info: dict, cwd: Path | None = None) -> dict:
    """Run ``cmd`` in ``cwd`` (default ``workdir``), output to ``workdir/train.log``; SIGINT it at ``budget_s``;
    write ``workdir/run.json``."""
    workdir.mkdir(parents=True, exist_ok=True)
    cwd = cwd or workdir
    print(f"  $ {' '.join(cmd)}   (in {cwd}, limit {budget_s / 60:.1f} min)", flush=True)
    load = os.getloadavg()
    with open(workdir / "train.log", "w") as log:
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        stopped = False
        for sig in (None, signal.SIGINT, signal.SIGTERM, signal.SIGKILL):  # dp ignores SIGINT for a long while
            if sig is not None:
                stopped = True
                proc.send_signal(sig)
            try:
                proc.wait(timeout=max(budget_s - (time.time() - start), 1.0) if sig is None else 20)
                break
            except subprocess.TimeoutExpired:
                continue
        proc.wait()
    run = dict(info, command=cmd, start_time=start, wall_s=time.time() - start, returncode=proc.returncode,
               stopped_by_budget=stopped, budget_s=budget_s, load_average_start=load,
               load_average_end=os.getloadavg())
    (workdir / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    if proc.returncode and not stopped:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}); see {workdir / 'train.log'}")
    return run


def jax_run(args, workdir: Path, steps: int, every: int, budget_s: float) -> dict:
    sets = {"steps": steps, "checkpoint_every": every, "keep_checkpoints": 10 * args.points + 10,
            "validate_every": steps, "max_val_frames": 0}
    cmd = [args.jax_python, str(ROOT / "train.py"), "--config", args.config, "--workdir", str(workdir), "--quiet",
           "--set", f"optimizer.warmup_steps={warmup(steps)}"]
    for k, v in sets.items():
        cmd += ["--set", f"training.{k}={v}"]
    return launch(cmd, workdir, budget_s, {"steps": steps, "save_every": every}, cwd=ROOT)


def jax_checkpoints(workdir: Path) -> list[dict]:
    out = []
    for d in sorted((workdir / "checkpoints").glob("step_*")):
        if (d / "state.msgpack").is_file():
            out.append({"step": int(d.name[5:]), "file": str(d / "state.msgpack"),
                        "mtime": (d / "state.msgpack").stat().st_mtime})
    return out


def warmup(steps: int) -> int:
    return min(max(1, round(WARMUP_FRACTION * steps)), steps - 1)


def reference_input(config, base: Path, steps: int, every: int) -> dict:
    """``input.json`` of ``dp --pt train`` with the hyper-parameters of a dpa4-jax Config (paths relative to
    ``base``)."""
    import reference

    from dpa4_jax.config import resolve_path

    o, t, w = config.optimizer, config.training, config.loss
    systems = [str(resolve_path(p, base).resolve()) for p in config.data.train]
    return {
        "model": reference.model_params(config.model),
        "learning_rate": {"type": "wsd", "start_lr": o.lr, "stop_lr": o.lr_min, "warmup_steps": warmup(steps),
                          "warmup_start_factor": o.warmup_start_factor, "decay_phase_ratio": o.decay_ratio,
                          "decay_type": o.decay_type},
        "optimizer": {"type": "HybridMuon", "momentum": o.momentum, "adam_beta1": o.adam_betas[0],
                      "adam_beta2": o.adam_betas[1], "weight_decay": o.weight_decay, "muon_mode": o.muon_mode,
                      "magma_muon": o.magma_lite},
        "loss": {"type": "ener", "loss_func": "mae", "f_use_norm": True,
                 "start_pref_e": w.energy, "limit_pref_e": w.energy, "start_pref_f": w.forces,
                 "limit_pref_f": w.forces, "start_pref_v": w.virial, "limit_pref_v": w.virial},
        "training": {"training_data": {"systems": systems, "batch_size": 1}, "numb_steps": steps,
                     "gradient_max_norm": t.grad_clip, "enable_ema": True, "ema_decay": t.ema_decay,
                     "save_freq": every, "max_ckpt_keep": 10 * steps, "disp_freq": every, "seed": t.seed},
    }


def reference_run(args, config, workdir: Path, steps: int, every: int, budget_s: float) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    inp = reference_input(config, Path(args.config).resolve().parent, steps, every)
    (workdir / "input.json").write_text(json.dumps(inp, indent=1) + "\n")
    return launch([args.dp, "--pt", "train", "input.json"], workdir, budget_s,
                  {"steps": steps, "save_every": every, "input": inp})


def reference_checkpoints(workdir: Path) -> list[dict]:
    out = []
    for f in workdir.glob("model.ckpt-*.pt"):
        ema = workdir / f.name.replace("model.ckpt", "model_ema.ckpt")
        out.append({"step": int(re.search(r"-(\d+)\.pt$", f.name).group(1)), "file": str(f),
                    "ema_file": str(ema) if ema.is_file() else None, "mtime": f.stat().st_mtime})
    return sorted(out, key=lambda c: c["step"])


def checkpoints(side: str, workdir: Path) -> list[dict]:
    return jax_checkpoints(workdir) if side == "jax" else reference_checkpoints(workdir)


def train(side: str, args, config, workdir: Path, budget_s: float, steps: int, points: int) -> dict:
    """A fresh training run of ``steps`` steps with ``points`` checkpoints, stopped at ``budget_s``."""
    if workdir.exists():
        shutil.rmtree(workdir)  # train.py would resume; dp would mix checkpoints
    every = max(1, steps // points)
    return jax_run(args, workdir, steps, every, budget_s) if side == "jax" else \
        reference_run(args, config, workdir, steps, every, budget_s)


def rate(run: dict, points: list[dict]) -> dict:
    """Seconds per step between the first and last checkpoint, and start-up (launch to step 0)."""
    if len(points) < 2:
        return {"s_per_step": None, "steps_per_s": None, "startup_s": None}
    a, b = points[0], points[-1]
    s = (b["mtime"] - a["mtime"]) / (b["step"] - a["step"])
    return {"s_per_step": s, "steps_per_s": 1 / s, "startup_s": a["mtime"] - run["start_time"] - s * a["step"]}


def calibrate(side: str, args, config, workdir: Path) -> dict:
    n = args.jax_calib_steps if side == "jax" else args.ref_calib_steps
    print(f"calibrating {LABELS[side]}: {n} steps", flush=True)
    run = train(side, args, config, workdir, 3600.0, n, points=4)
    measured = rate(run, checkpoints(side, workdir))
    if measured["s_per_step"] is None:
        raise RuntimeError(f"calibration of {side}: fewer than 2 checkpoints; see {workdir / 'train.log'}")
    print(f"  {measured['s_per_step']:.3f} s/step, start-up {measured['startup_s']:.0f} s", flush=True)
    return dict(measured, steps=n, wall_s=run["wall_s"])


# ------------------------------------------------------------------------------------------ scoring


def score(side: str, workdir: Path, config, frames) -> list[dict]:
    """EMA and raw-weight errors of every checkpoint of a side on ``frames`` (cached in evaluations.json)."""
    from dpa4_jax.calculator import DPA4Calculator
    from dpa4_jax.convert import from_deepmd
    from dpa4_jax.evaluate import evaluate
    from dpa4_jax import checkpoint

    run = json.loads((workdir / "run.json").read_text())
    cache_path = workdir / "evaluations.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    points = []
    for c in checkpoints(side, workdir):
        t = c["mtime"] - run["start_time"]
        if t > run["budget_s"]:
            continue
        point = {"step": c["step"], "time_s": round(t, 2)}
        for kind in ("ema", "raw"):
            key = f"{Path(c['file']).relative_to(workdir)}:{kind}:{c['mtime']}"
            if key not in cache:
                if side == "jax":
                    raw = checkpoint.load_raw(Path(c["file"]).parent)
                    variables = {"params": raw["state"]["ema_params" if kind == "ema" else "params"],
                                 "stats": raw["stats"]}
                    calc = DPA4Calculator(config.model, variables, dtype="float32")
                else:
                    cfg, variables = from_deepmd(c["ema_file"] if kind == "ema" else c["file"])
                    calc = DPA4Calculator(cfg, variables, dtype="float32")  # same shapes: no recompilation
                r = evaluate(calc, frames, progress=False)
                cache[key] = {k: r[k] for k in ("energy_mae", "force_mae", "energy_rmse", "force_rmse")}
                cache_path.write_text(json.dumps(cache, indent=1) + "\n")
            point[kind] = cache[key]
        points.append(point)
        print(f"  {LABELS[side]} step {c['step']:5d} at {t / 60:5.1f} min: E {point['ema']['energy_mae']:8.3f} / "
              f"{point['raw']['energy_mae']:8.3f} meV/atom, F {point['ema']['force_mae']:7.1f} / "
              f"{point['raw']['force_mae']:7.1f} meV/A (EMA / raw)", flush=True)
    return points


def side_result(side: str, workdir: Path, config, frames) -> dict:
    run = json.loads((workdir / "run.json").read_text())
    points = score(side, workdir, config, frames)
    calib_file = workdir.parent / f"calibration_{side}.json"
    hyper = run.pop("input", None) or yaml_load(workdir / "config.yaml")
    date = datetime.datetime.fromtimestamp(run["start_time"], datetime.timezone.utc).isoformat(timespec="seconds")
    return dict(run, date=date, hyper_parameters=hyper, measured=rate(run, checkpoints(side, workdir)),
                calibration=json.loads(calib_file.read_text()) if calib_file.is_file() else None, points=points)


def yaml_load(path: Path):
    import yaml

    return yaml.safe_load(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------------------------------ report


def versions(jax_python: str) -> dict:
    import reference

    code = ("import json, jax, jaxlib, flax, optax, numpy; print(json.dumps({m.__name__: m.__version__ "
            "for m in (jax, jaxlib, flax, optax, numpy)}))")
    out = json.loads(subprocess.run([jax_python, "-c", code], capture_output=True, text=True, check=True).stdout)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    return dict(out, **reference.versions(), **{"dpa4-jax": commit.stdout.strip()})


def plot(info: dict, png: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, unit in zip(axes, ("energy_mae", "force_mae"), ("meV/atom", "meV/Å")):
        for side, color in zip(SIDES, ("C0", "C3")):
            points = info["sides"].get(side, {}).get("points", [])
            if not points:
                continue
            t = [p["time_s"] / 60 for p in points]
            ax.plot(t, [p["ema"][key] for p in points], "o-", color=color, label=f"{LABELS[side]}, EMA weights")
            ax.plot(t, [p["raw"][key] for p in points], "s--", color=color, alpha=0.6, ms=4,
                    label=f"{LABELS[side]}, raw weights")
        for budget in {r["budget_s"] for r in info["sides"].values()}:
            ax.axvline(budget / 60, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("wall-clock time since launch (min)")
        ax.set_ylabel(f"validation {key.split('_')[0]} MAE ({unit})")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=8)
    v, m = info["versions"], info["machine"]
    fig.suptitle(f"DPA4 (configs/water.yaml) on water, scored on data_3; {m['cpu']} ({m['cpu_count']} cores), "
                 f"{info['threads']['threads']} threads; jax {v['jax']}, torch {v['torch']}, "
                 f"deepmd-kit {v['deepmd-kit']}; {info['date'][:10]}", fontsize=9)
    return save_figure(fig, png)


def best(points: list[dict], key: str) -> float:
    return min(min(p["ema"][key], p["raw"][key]) for p in points)


def print_summary(info: dict) -> None:
    m = info["machine"]
    print(f"\nWater, {info['budget_s'] / 60:g} min per side, {m['cpu']} ({m['cpu_count']} cores), "
          f"{info['threads']['threads']} threads, {info['date']}; errors on data_3 ({info['validation']['frames']} "
          "frames), float32, EMA / raw weights")
    head = f"{'side':<22} {'steps':>6} {'s/step':>7} {'start-up':>8} {'stopped':>7} | {'E MAE meV/atom':>17} " \
           f"{'F MAE meV/A':>15} | {'best E':>7} {'best F':>7}"
    print(head)
    print("-" * len(head))
    for side, r in info["sides"].items():
        pts, m = r["points"], r["measured"]
        if not pts:
            print(f"{LABELS[side]:<22} no checkpoint inside the budget")
            continue
        last = pts[-1]
        sps = f"{m['s_per_step']:7.3f}" if m["s_per_step"] else f"{'-':>7}"
        start = f"{m['startup_s']:7.0f}s" if m["startup_s"] is not None else f"{'-':>8}"
        print(f"{LABELS[side]:<22} {last['step']:6d} {sps} {start} {r['stopped_by_budget']!s:>7} | "
              f"{last['ema']['energy_mae']:8.3f}/{last['raw']['energy_mae']:8.3f} "
              f"{last['ema']['force_mae']:7.1f}/{last['raw']['force_mae']:7.1f} | "
              f"{best(pts, 'energy_mae'):7.3f} {best(pts, 'force_mae'):7.1f}")
    print("steps = last checkpoint inside the budget; s/step between checkpoints; start-up = launch to step 0")


# ------------------------------------------------------------------------------------------ main


def main():
    args = parse_args()
    args.config, args.workdir, args.output = (str(Path(p).resolve()) for p in (args.config, args.workdir, args.output))
    os.chdir(ROOT)  # the configs' data paths are relative to the repository root
    host = machine()
    threads = set_threads(args.threads)  # inherited by the training subprocesses

    from dpa4_jax.config import load_config, resolve_path
    from dpa4_jax.data import read_frames

    config = load_config(args.config)
    budget_s = 60.0 * args.budget_min
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    sides = [args.only] if args.only else list(SIDES)

    if not args.evaluate_only:
        if load_start[0] > 0.3:
            print(f"WARNING: load average {load_start[0]:.2f}: other processes slow the runs (the reference's "
                  "OpenMP threads by up to 20x on this 2-core machine); run on an idle machine", flush=True)
        for side in sides:
            steps = args.jax_steps if side == "jax" else args.ref_steps
            calib_file = workdir / f"calibration_{side}.json"
            if steps is None:
                calib = calibrate(side, args, config, workdir / f"calibration_{side}")
                calib_file.write_text(json.dumps(calib, indent=1) + "\n")
                steps = max(2, int(args.safety * (budget_s - calib["startup_s"]) / calib["s_per_step"]))
            elif calib_file.exists():
                calib_file.unlink()
            print(f"training {LABELS[side]}: {steps} steps in at most {args.budget_min:g} min", flush=True)
            run = train(side, args, config, workdir / side, budget_s, steps, args.points)
            print(f"  done in {run['wall_s'] / 60:.1f} min{' (stopped at the budget)' * run['stopped_by_budget']}",
                  flush=True)

    base = Path(args.config).resolve().parent
    frames = list(read_frames(resolve_path(config.data.validation[0], base)))
    info = {"date": date, "machine": host, "versions": versions(args.jax_python), "threads": threads,
            "budget_s": budget_s, "load_average_start": load_start, "config": args.config,
            "validation": {"data": str(config.data.validation[0]), "frames": len(frames),
                           "evaluator": "dpa4_jax.evaluate.evaluate, float32, EMA and raw weights",
                           "units": "energy meV/atom, force meV/A per component"},
            "time_axis": "checkpoint file mtime - launch of the training process (start-up and compilation "
                         "included; dpa4-jax runs no in-training validation, the reference has no validation data)",
            "loss_match": "reference ener loss, loss_func mae, f_use_norm true, start_pref = limit_pref "
                          "(20/20/5): the same as paper Eq. 43 in dpa4-jax", "differences": DIFFERENCES, "sides": {}}
    for side in SIDES:
        if (workdir / side / "run.json").is_file():
            print(f"scoring {LABELS[side]} checkpoints on {len(frames)} frames ...", flush=True)
            info["sides"][side] = side_result(side, workdir / side, config, frames)
    info["load_average_end"] = os.getloadavg()
    out = Path(args.output)
    png = plot(info, out.with_suffix(".png"))
    print_summary(info)
    write_json(info, out, png)


if __name__ == "__main__":
    main()
