"""C-Si dimer scan (paper Fig. 4): native ZBL zone bridging vs a DP-ZBL-style energy splice.

A C-Si dimer (non-periodic, bond along a fixed random direction) is scanned from
``--r-min`` to ``--r-max`` A. Curves, energy and radial force ``F_r = -dE/dr`` (positive =
repulsive):

* ``ZBL``: the analytical pair potential ``dpa4_jax.zbl.zbl_pair_energy`` (paper Eq. 39-40),
  its force by ``jax.grad``.
* ``DPA4 bridged``: a dpa4-jax model with ``bridging="zbl"`` (r_in 0.5, r_out 0.8 A): the
  learned branch sees the C3-clamped distance and the source-freeze gate (Eq. 2-5), the
  ZBL branch the true distance, one energy, forces by autodiff through the calculator.
* ``learned only``: the same weights with ``bridging="none"`` (no ZBL, no clamp).
* ``DP-ZBL splice``: paper Eq. 41, ``E = lam E_ZBL + (1 - lam) E_learned`` with the
  learned-only model, ``lam`` = 1 below ``sw_rmin``, 0 above ``sw_rmax`` and
  ``1 - 10u^3 + 15u^4 - 6u^5`` (``u = (r - sw_rmin)/(sw_rmax - sw_rmin)``) between: DeePMD-kit
  DP-ZBL's switching form, applied to its soft-min neighbour distance, which for a dimer is r.
  Its force is Eq. 42: ``lam F_ZBL + (1 - lam) F_learned - lam'(r) (E_ZBL - E_learned)``;
  the last term is the switching force. Default window = the bridging window.

The model is random (``--seed``), float64, its zero-initialised weights (the residual
projections: a fresh model has zero forces) filled with 0.1 N(0, 1) as in ``inference.py``
(``--weights perturb-all`` perturbs every parameter instead, as ``tests/conftest.py``
does; a much rougher learned curve). There is no C-Si training set here, so the learned
part is arbitrary: the test is the coupling, not the physics. ``--config`` takes the model section of a YAML instead of the small default model
(type map then must contain C and Si); bridging is switched on either way.

Run from the repository root:

    python benchmarks/zbl_dimer.py
    python benchmarks/zbl_dimer.py --splice-window 0.6 1.2 --points 1000

Writes ``benchmarks/results/zbl_dimer.json`` and ``zbl_dimer.png`` (``--output``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import RESULTS, fill_zero_weights, header, machine, perturb_weights, pyplot, save_figure, write_json  # noqa: E402

SMALL = dict(type_map=("C", "Si"), rcut=5.0, channels=32, n_radial=8, lmax=2, mmax=1, n_blocks=2, mixing_layers=2,
             n_focus=1, radial_so2_rank=1, sel=60)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--r-min", type=float, default=0.2)
    p.add_argument("--r-max", type=float, default=3.0)
    p.add_argument("--points", type=int, default=561, help="distances in the scan")
    p.add_argument("--r-inner", type=float, default=0.5, help="bridging r_in (A)")
    p.add_argument("--r-outer", type=float, default=0.8, help="bridging r_out (A)")
    p.add_argument("--splice-window", type=float, nargs=2, default=None, metavar=("SW_RMIN", "SW_RMAX"),
                   help="DP-ZBL switching window (default: the bridging window)")
    p.add_argument("--config", default=None, help="model section of this YAML instead of the small default model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=["fill-zeros", "perturb-all"], default="fill-zeros",
                   help="fill-zeros: only the zero-initialised weights get --scale * N(0, 1) (as inference.py); "
                        "perturb-all: every parameter + --scale * N(0, 1) (as tests/conftest.py)")
    p.add_argument("--scale", type=float, default=0.1)
    p.add_argument("--output", default=str(RESULTS / "zbl_dimer.json"))
    return p.parse_args()


def switch(r, lo, hi):
    """DP-ZBL-style weight of the ZBL branch and its derivative in r."""
    u = np.clip((r - lo) / (hi - lo), 0.0, 1.0)
    lam = 1 - 10 * u**3 + 15 * u**4 - 6 * u**5
    dlam = (-30 * u**2 + 60 * u**3 - 30 * u**4) / (hi - lo)
    return lam, np.where((r > lo) & (r < hi), dlam, 0.0)


def scan(calc, r, direction):
    """Energies and radial forces (on Si, along the C->Si bond) of the dimer at distances ``r``."""
    from ase import Atoms

    energies, forces = [], []
    for d in r:
        atoms = Atoms("CSi", positions=[np.zeros(3), d * direction], pbc=False)
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
        forces.append(float(atoms.get_forces()[1] @ direction))
    return np.array(energies), np.array(forces)


def main():
    args = parse_args()
    host = machine()
    from dpa4_jax import DPA4Calculator
    from dpa4_jax.variables import init_variables
    from dpa4_jax.config import ModelConfig, load_model_config
    from dpa4_jax.zbl import zbl_pair_energy

    base = load_model_config(args.config) if args.config else ModelConfig(**SMALL)
    bridged = dataclasses.replace(base, bridging="zbl", bridging_r_inner=args.r_inner, bridging_r_outer=args.r_outer)
    learned = dataclasses.replace(base, bridging="none")
    variables = init_variables(bridged, seed=args.seed, dtype="float64")
    params = (fill_zero_weights(variables["params"], args.scale, args.seed) if args.weights == "fill-zeros"
              else perturb_weights(variables["params"], args.seed, args.scale))
    variables = {"params": params, "stats": variables["stats"]}  # energy bias 0
    sw = tuple(args.splice_window or (args.r_inner, args.r_outer))

    r = np.linspace(args.r_min, args.r_max, args.points)
    rng = np.random.default_rng(args.seed)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    e_b, f_b = scan(DPA4Calculator(bridged, variables, dtype="float64"), r, direction)
    e_nn, f_nn = scan(DPA4Calculator(learned, variables, dtype="float64"), r, direction)
    zbl = lambda x: zbl_pair_energy(x, jnp.float64(6.0), jnp.float64(14.0))
    e_zbl = np.asarray(jax.vmap(zbl)(jnp.asarray(r)))
    f_zbl = -np.asarray(jax.vmap(jax.grad(zbl))(jnp.asarray(r)))
    lam, dlam = switch(r, *sw)
    e_s = lam * e_zbl + (1 - lam) * e_nn
    f_switch = -dlam * (e_zbl - e_nn)
    f_s = lam * f_zbl + (1 - lam) * f_nn + f_switch

    inner = r < args.r_inner
    win_b = (r >= args.r_inner) & (r <= args.r_outer)
    win_s = (r >= sw[0]) & (r <= sw[1])
    # Smoothness of the force: the largest |dF/dr| in the window, against the ZBL force's own.
    slope = lambda f, m: float(np.max(np.abs(np.gradient(f, r)[m])))
    summary = {
        "bridged_inner_max_abs_force_minus_zbl": float(np.max(np.abs(f_b - f_zbl)[inner])),
        "bridged_inner_max_rel_force_minus_zbl": float(np.max(np.abs(f_b - f_zbl)[inner] / np.abs(f_zbl[inner]))),
        "bridged_inner_energy_minus_zbl_spread": float(np.ptp((e_b - e_zbl)[inner])),
        "bridged_window_max_abs_force_minus_zbl": float(np.max(np.abs(f_b - f_zbl)[win_b])),
        "splice_window_max_switching_force": float(np.max(np.abs(f_switch[win_s]))),
        "splice_window_max_abs_force_minus_zbl": float(np.max(np.abs(f_s - f_zbl)[win_s])),
        "zbl_force_in_window": [float(f_zbl[win_s].min()), float(f_zbl[win_s].max())],
        "max_dF_dr_in_window": {"zbl": slope(f_zbl, win_b | win_s), "bridged": slope(f_b, win_b),
                                "splice": slope(f_s, win_s)},
    }
    print(f"C-Si dimer, {len(r)} distances {args.r_min}-{args.r_max} A; model {variables_count(variables):,} "
          f"parameters ({args.weights}, scale {args.scale}), bridging window [{args.r_inner}, {args.r_outer}] A, "
          f"splice window [{sw[0]}, {sw[1]}] A")
    print(f"\n{'r (A)':>6} | {'E_ZBL':>10} {'E_bridged':>10} {'E_learned':>10} {'E_splice':>10} | "
          f"{'F_ZBL':>10} {'F_bridged':>10} {'F_learned':>10} {'F_splice':>10} {'F_switch':>10}")
    marks = sorted({args.r_min, 0.3, 0.4, args.r_inner, 0.5 * (args.r_inner + args.r_outer), args.r_outer,
                    sw[0], 0.5 * sum(sw), sw[1], 1.0, 1.5, 2.0, args.r_max})
    for x in marks:
        i = int(np.argmin(np.abs(r - x)))
        print(f"{r[i]:6.3f} | {e_zbl[i]:10.3f} {e_b[i]:10.3f} {e_nn[i]:10.3f} {e_s[i]:10.3f} | "
              f"{f_zbl[i]:10.3f} {f_b[i]:10.3f} {f_nn[i]:10.3f} {f_s[i]:10.3f} {f_switch[i]:10.3f}")
    print("energies in eV, radial forces in eV/A (positive: repulsive)")
    print(f"\nr < r_in: max |F_bridged - F_ZBL| = {summary['bridged_inner_max_abs_force_minus_zbl']:.2e} eV/A "
          f"(relative {summary['bridged_inner_max_rel_force_minus_zbl']:.1e}); E_bridged - E_ZBL constant to "
          f"{summary['bridged_inner_energy_minus_zbl_spread']:.1e} eV")
    print(f"bridging window: max |F_bridged - F_ZBL| = {summary['bridged_window_max_abs_force_minus_zbl']:.1f} eV/A; "
          f"splice window: max switching force |lam' (E_ZBL - E_learned)| = "
          f"{summary['splice_window_max_switching_force']:.1f} eV/A, max |F_splice - F_ZBL| = "
          f"{summary['splice_window_max_abs_force_minus_zbl']:.1f} eV/A (F_ZBL there "
          f"{summary['zbl_force_in_window'][0]:.0f} to {summary['zbl_force_in_window'][1]:.0f} eV/A)")
    s = summary["max_dF_dr_in_window"]
    print(f"max |dF/dr| in the window: ZBL {s['zbl']:.0f}, bridged {s['bridged']:.0f}, splice {s['splice']:.0f} eV/A^2")

    out = Path(args.output)
    png = plot(out.with_suffix(".png"), r, (e_zbl, e_b, e_nn, e_s), (f_zbl, f_b, f_nn, f_s),
               (args.r_inner, args.r_outer), sw)
    info = header(host, threads={"cpu_affinity": sorted(os.sched_getaffinity(0)),
                                 "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")},
                  model={**{k: v for k, v in dataclasses.asdict(bridged).items() if k != "type_map"},
                         "type_map": list(bridged.type_map), "parameters": variables_count(variables),
                         "weights": f"random init (seed {args.seed}), {args.weights} with {args.scale} N(0,1), float64"},
                  splice={"sw_rmin": sw[0], "sw_rmax": sw[1], "form": "1 - 10u^3 + 15u^4 - 6u^5"},
                  summary=summary, plot=str(png) if png else None,
                  scan={"r": r.tolist(), "energy": {"zbl": e_zbl.tolist(), "bridged": e_b.tolist(),
                                                    "learned": e_nn.tolist(), "splice": e_s.tolist()},
                        "force": {"zbl": f_zbl.tolist(), "bridged": f_b.tolist(), "learned": f_nn.tolist(),
                                  "splice": f_s.tolist(), "switching_term": f_switch.tolist()}})
    write_json(info, out, png)


def variables_count(variables) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(variables["params"])))


def plot(path, r, energies, forces, bridge, sw) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    labels = ("ZBL (analytical)", "DPA4 native ZBL bridging", "learned only (no ZBL)", "DP-ZBL-style splice (Eq. 41)")
    styles = (dict(color="k", lw=2.5, alpha=0.35), dict(color="tab:blue", lw=1.5), dict(color="tab:gray", lw=1, ls=":"),
              dict(color="tab:red", lw=1.2, ls="--"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, ys, name in ((axes[0], energies, "energy (eV)"), (axes[1], forces, "radial force $-dE/dr$ (eV/Å)")):
        for y, lab, st in zip(ys, labels, styles):
            ax.plot(r, y, label=lab, **st)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylabel(name + ", symlog")
    zoom = (r > min(bridge[0], sw[0]) - 0.25) & (r < max(bridge[1], sw[1]) + 0.4)
    for y, lab, st in zip(forces, labels, styles):
        axes[2].plot(r[zoom], y[zoom], label=lab, **st)
    axes[2].set_ylabel("radial force (eV/Å), linear")
    axes[2].set_title("force around the switching window")
    for ax in axes:
        ax.axvspan(*bridge, color="tab:blue", alpha=0.08)
        if tuple(sw) != tuple(bridge):
            ax.axvspan(*sw, color="tab:red", alpha=0.06)
        ax.set_xlabel("C-Si distance r (Å)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("C-Si dimer, random model (shaded: switching window)")
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
