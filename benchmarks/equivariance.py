"""Numerical equivariance of the S2-grid non-linearity (paper Table 3 and Table S-1) and of the whole model.

Part 1, the grid product of the FFN (``dpa4_jax/nn/ffn.py``)::

    f(a, b) = from_grid(to_grid(a) * to_grid(b))       (a, b: coefficients up to degree L)

and its equivariance error ``max |f(D a, D b) - D f(a, b)|`` over random rotations
(real Wigner-D from ``dpa4_jax.so3.wigner.edge_frames``), with a, b ~ N(0, 1),
``--rotations`` rotations x ``--channels`` channels, for L = 2..7, in float64 and in
float32 (every array cast to float32, products in float32). Three grids:

* ``product``: the reference's latitude-longitude grid, built by DeePMD-kit 3.2.0 itself
  (``deepmd.dpmodel.descriptor.dpa4_nn.projection.S2GridProjector``, ``grid_method="e3nn"``:
  e3nn's midpoint polar grid with its quadrature weights, uniform azimuth), at the
  resolution the reference uses: ``(R_phi, R_theta) = (2 mmax + 4, ceil_even(3 L + 2))``,
  lifted to a square ``R x R`` grid with ``R = max`` for the full-coefficient FFN (Table 3).
  Skipped when DeePMD-kit is not importable.
* ``product-f32tables``: the same tables rounded to float32 (then used in float64 or float32).
* ``product-pytorch``: the same grid built by DeePMD-kit's PyTorch backend
  (``deepmd.pt...sezm_nn.projection.S2GridProjector``, float64 buffers), only when torch is
  importable (e.g. under /work/refvenv). Its tables come from e3nn's ``ToS2Grid``/``FromS2Grid``
  in torch's default dtype, float32: compare with ``product-f32tables``;
  ``product-pytorch-f64``: the same, built with torch's default dtype set to float64.
* ``gauss-legendre``: a Gauss-Legendre (polar) x uniform (azimuth) grid with the same
  ``(R_phi, R_theta)``, built here, for contrast: the error of the product grid comes
  from its polar rule, not from the number of points.
* ``lebedev``: dpa4-jax's grid, ``LebedevGrid.for_product(L).projections(L)`` (the smallest
  rule with precision >= 3L), as used by the model.

Full-coefficient case (Table 3): random SO(3) rotations, all (L+1)^2 coefficients.
m-truncated case (Table S-1, ``--mmax``, default 1 2): only the coefficients with
|m| <= M, rotations about the local z axis (the SO(2) convolution's layout); degrees l > M
are rescaled by sqrt((2l+1)/(2M+1)) on both projections, as in the reference.

Part 2, the whole model: forces of a randomly initialised, perturbed model (every
parameter + 0.1 N(0, 1), as ``tests/conftest.py`` does) on a rattled periodic cell, rotated
(positions and cell) by random rotations: ``max |F(R x) - R F(x)|`` and ``|E(R x) - E(x)|``,
in float64 and float32. The model is ``--model-config`` (default: DPA4-Air's model section).

Run from the repository root:

    python benchmarks/equivariance.py
    python benchmarks/equivariance.py --lmax 2 3 4 --rotations 16 --model-atoms 32

Writes ``benchmarks/results/equivariance.json`` and ``equivariance.png`` (``--output``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import HERE, ROOT, header, machine, perturb_weights, pyplot, save_figure, write_json  # noqa: E402
from workloads import structures  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lmax", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7], help="degrees L")
    p.add_argument("--mmax", type=int, nargs="*", default=[1, 2], help="M of the m-truncated case (none: skip)")
    p.add_argument("--rotations", type=int, default=64, help="random rotations per case")
    p.add_argument("--channels", type=int, default=16, help="channels of the random features")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-config", default=str(ROOT / "configs" / "air_mptrj.yaml"),
                   help="model section of this YAML for the whole-model test")
    p.add_argument("--model-atoms", type=int, default=32, choices=[32, 108], help="atoms of the rattled cell")
    p.add_argument("--model-rotations", type=int, default=3)
    p.add_argument("--no-model", action="store_true", help="skip the whole-model test")
    p.add_argument("--output", default=str(HERE / "results" / "equivariance.json"))
    return p.parse_args()


# ------------------------------------------------------------------------------------ grids


def ceil_even(n: int) -> int:
    return n + n % 2


def resolution(lmax: int, mmax: int, square: bool) -> tuple[int, int]:
    """The reference's product-grid resolution ``(R_phi, R_theta)`` (square lift for the full-coefficient FFN)."""
    r_phi, r_theta = 2 * mmax + 4, ceil_even(3 * lmax + 2)
    return (max(r_phi, r_theta),) * 2 if square else (r_phi, r_theta)


def kept(lmax: int, mmax: int) -> np.ndarray:
    """Packed indices with |m| <= mmax, l-major."""
    from dpa4_jax.so3.layout import packed_index

    return np.array([packed_index(l, m) for l in range(lmax + 1) for m in range(-min(l, mmax), min(l, mmax) + 1)])


def truncation_scale(lmax: int, mmax: int) -> np.ndarray:
    """Per kept coefficient: sqrt((2l+1)/(2M+1)) for l > M, else 1 (the reference's rescale)."""
    from dpa4_jax.so3.layout import degree_of_packed

    l = degree_of_packed(lmax)[kept(lmax, mmax)].astype(float)
    return np.where(l > mmax, np.sqrt((2 * l + 1) / (2 * mmax + 1)), 1.0)


def restrict(to_grid, from_grid, lmax, mmax):
    idx, s = kept(lmax, mmax), truncation_scale(lmax, mmax)
    return to_grid[:, idx] * s[None], from_grid[idx] * s[:, None]


def lebedev(lmax: int, mmax: int):
    from dpa4_jax.so3.lebedev import LebedevGrid

    grid = LebedevGrid.for_product(lmax)
    to_grid, from_grid = grid.projections(lmax)
    return restrict(to_grid, from_grid, lmax, mmax), f"p={grid.precision}", len(grid.weights)


def gauss_legendre(lmax: int, mmax: int, square: bool):
    """Gauss-Legendre in cos(theta) x uniform phi, polar axis z (the local edge axis)."""
    from dpa4_jax.so3.lebedev import LebedevGrid

    r_phi, r_theta = resolution(lmax, mmax, square)
    x, w = np.polynomial.legendre.leggauss(r_theta)
    phi = 2 * np.pi * np.arange(r_phi) / r_phi
    st = np.sqrt(1 - x * x)
    points = np.stack([np.outer(st, np.cos(phi)), np.outer(st, np.sin(phi)), np.outer(x, np.ones(r_phi))], -1)
    weights = np.outer(w / 2, np.full(r_phi, 1.0 / r_phi))
    grid = LebedevGrid(0, points.reshape(-1, 3), weights.reshape(-1))  # any (points, weights) rule
    to_grid, from_grid = grid.projections(lmax)
    return restrict(to_grid, from_grid, lmax, mmax), f"{r_phi}x{r_theta}", r_phi * r_theta


def product_reference(lmax: int, mmax: int, square: bool):
    """The reference's e3nn-style grid, built by DeePMD-kit (None when it is not importable)."""
    try:
        from deepmd.dpmodel.descriptor.dpa4_nn.projection import S2GridProjector
    except Exception:
        return None
    r_phi, r_theta = resolution(lmax, mmax, square)
    proj = S2GridProjector(lmax=lmax, mmax=mmax, precision="float64", grid_resolution_list=[r_phi, r_theta],
                           coefficient_layout="packed", grid_method="e3nn")
    assert np.array_equal(proj._build_coefficient_index(), kept(lmax, mmax))
    return (np.asarray(proj.to_grid_mat, np.float64), np.asarray(proj.from_grid_mat, np.float64)), \
        f"{r_phi}x{r_theta}", r_phi * r_theta


def product_pytorch(lmax: int, mmax: int, square: bool, default_float64: bool = False):
    """The same grid built by DeePMD-kit's PyTorch backend (the code that made the paper's numbers), float64
    buffers; None without torch. Its e3nn ``ToS2Grid``/``FromS2Grid`` tables are computed in torch's default
    dtype: float32, or float64 with ``default_float64`` (``torch.set_default_dtype`` around the construction)."""
    try:
        import torch
        from deepmd.pt.model.descriptor.sezm_nn.projection import S2GridProjector
    except Exception:
        return None
    r_phi, r_theta = resolution(lmax, mmax, square)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if default_float64 else previous)
    try:
        proj = S2GridProjector(lmax=lmax, mmax=mmax, dtype=torch.float64, grid_resolution_list=[r_phi, r_theta],
                               coefficient_layout="packed", grid_method="e3nn")
    finally:
        torch.set_default_dtype(previous)
    return (proj.to_grid_mat.numpy(), proj.from_grid_mat.numpy()), f"{r_phi}x{r_theta}", r_phi * r_theta


def rounded_to_float32(grid):
    """A grid whose tables were computed in float32 (then used in float64)."""
    if grid is None:
        return None
    (to_grid, from_grid), rule, points = grid
    return (to_grid.astype(np.float32).astype(np.float64), from_grid.astype(np.float32).astype(np.float64)), rule, points


# ------------------------------------------------------------------------------------ rotations


def wigner(rotations: np.ndarray, lmax: int) -> np.ndarray:
    """``(R, D, D)`` block-diagonal real Wigner-D in the packed basis (as ``tests/test_so3.py``)."""
    from dpa4_jax.so3.wigner import edge_frames

    blocks = jax.jit(edge_frames, static_argnums=(1, 2))(jnp.asarray(rotations, jnp.float64), lmax, lmax).blocks
    dim = (lmax + 1) ** 2
    d = np.zeros((len(rotations), dim, dim))
    for l, b in enumerate(blocks):
        d[:, l * l:(l + 1) ** 2, l * l:(l + 1) ** 2] = np.asarray(b)
    return d


def z_rotations(n: int, rng) -> np.ndarray:
    t = rng.uniform(0, 2 * np.pi, n)
    c, s, z, o = np.cos(t), np.sin(t), np.zeros(n), np.ones(n)
    return np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], -2)


@jax.jit
def grid_error(to_grid, from_grid, d, a, b):
    """``max |f(D a, D b) - D f(a, b)|``, everything in the dtype of the inputs."""

    def f(x, y):
        return jnp.einsum("jg,rgc->rjc", from_grid,
                          jnp.einsum("gj,rjc->rgc", to_grid, x) * jnp.einsum("gj,rjc->rgc", to_grid, y))

    rot = lambda x: jnp.einsum("rij,rjc->ric", d, x)
    return jnp.max(jnp.abs(f(rot(a), rot(b)) - rot(f(a, b))))


def grid_part(args) -> list[dict]:
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(args.seed)
    rows = []
    cases = [("full", None)] + [("m-truncated", m) for m in args.mmax]
    for kind, mmax in cases:
        for lmax in args.lmax:
            if mmax is not None and mmax > lmax:
                continue
            m = lmax if mmax is None else mmax
            square = mmax is None
            if mmax is None:
                rot = Rotation.random(args.rotations, random_state=rng.integers(2**31)).as_matrix()
            else:
                rot = z_rotations(args.rotations, rng)
            idx = kept(lmax, m)
            d = wigner(rot, lmax)[:, idx][:, :, idx]
            a = rng.standard_normal((args.rotations, len(idx), args.channels))
            b = rng.standard_normal((args.rotations, len(idx), args.channels))
            product = product_reference(lmax, m, square)
            grids = {"product": product, "product-f32tables": rounded_to_float32(product),
                     "product-pytorch": product_pytorch(lmax, m, square),
                     "product-pytorch-f64": product_pytorch(lmax, m, square, default_float64=True),
                     "gauss-legendre": gauss_legendre(lmax, m, square), "lebedev": lebedev(lmax, m)}
            for name, g in grids.items():
                if g is None:
                    continue
                (to_grid, from_grid), rule, points = g
                row = {"case": kind, "mmax": m, "lmax": lmax, "grid": name, "rule": rule, "points": points}
                for dtype in (np.float64, np.float32):
                    arrays = [jnp.asarray(x, dtype) for x in (to_grid, from_grid, d, a, b)]
                    row[np.dtype(dtype).name] = float(grid_error(*arrays))
                rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ whole model


def model_part(args) -> dict:
    from scipy.spatial.transform import Rotation

    from dpa4_jax import DPA4Calculator
    from dpa4_jax.variables import init_variables
    from dpa4_jax.config import load_model_config

    config = load_model_config(args.model_config)
    variables = init_variables(config, seed=args.seed, dtype="float64")
    params = perturb_weights(variables["params"], args.seed)
    atoms = structures(args.model_atoms, 1)[0]  # rattled fcc Cu
    rng = np.random.default_rng(args.seed)
    if "Au" in config.type_map:
        atoms.numbers[rng.choice(len(atoms), len(atoms) // 4, replace=False)] = 79
    atoms.rattle(0.1, seed=args.seed)
    rotations = Rotation.random(args.model_rotations, random_state=args.seed + 1).as_matrix()
    out = {"config": args.model_config, "atoms": len(atoms), "formula": atoms.get_chemical_formula(),
           "rotations": args.model_rotations, "perturbation": "every parameter + 0.1 N(0,1)"}
    for dtype in ("float64", "float32"):
        calc = DPA4Calculator(config, {"params": params, "stats": variables["stats"]}, dtype=dtype)
        out["parameters"] = calc.num_params

        def evaluate(a):
            a = a.copy()
            a.calc = calc
            return a.get_potential_energy(), a.get_forces()

        e0, f0 = evaluate(atoms)
        df, de = [], []
        for r in rotations:
            rotated = atoms.copy()
            rotated.set_cell(atoms.cell.array @ r.T, scale_atoms=False)
            rotated.positions = atoms.positions @ r.T
            e1, f1 = evaluate(rotated)
            df.append(float(np.max(np.abs(f1 - f0 @ r.T))))
            de.append(abs(e1 - e0))
        out[dtype] = {"max_force_error": max(df), "max_abs_force": float(np.max(np.abs(f0))),
                      "relative_force_error": max(df) / float(np.max(np.abs(f0))),
                      "max_energy_error": max(de), "energy": e0}
        print(f"  model {dtype}: max |F(Rx) - R F(x)| = {max(df):.2e} eV/A (max |F| {np.max(np.abs(f0)):.2f}), "
              f"|dE| = {max(de):.2e} eV", flush=True)
    return out


# ------------------------------------------------------------------------------------ output


def print_tables(rows, model):
    for case in dict.fromkeys(r["case"] for r in rows):
        for mmax in dict.fromkeys(r["mmax"] for r in rows if r["case"] == case):
            sel = [r for r in rows if r["case"] == case and (case == "full" or r["mmax"] == mmax)]
            grids = list(dict.fromkeys(r["grid"] for r in sel))
            title = ("Full-coefficient S2 product, random SO(3) rotations (Table 3)" if case == "full" else
                     f"m-truncated S2 product, M = {mmax}, random z rotations (Table S-1)")
            print(f"\n{title}: max |f(Da, Db) - D f(a, b)|")
            head = f"{'L':>2} | " + " | ".join(f"{g[:19]:^19}" for g in grids)
            print(head)
            print(f"{'':>2} | " + " | ".join(f"{'fp64':>9} {'fp32':>9}" for _ in grids))
            print("-" * len(head))
            for lmax in dict.fromkeys(r["lmax"] for r in sel):
                cells = []
                for g in grids:
                    r = next(r for r in sel if r["lmax"] == lmax and r["grid"] == g)
                    cells.append(f"{r['float64']:9.2e} {r['float32']:9.2e}")
                print(f"{lmax:2d} | " + " | ".join(cells))
            print("rules (points): " + "; ".join(
                f"{g} " + ", ".join(f"L{r['lmax']} {r['rule']} ({r['points']})" for r in sel if r["grid"] == g)
                for g in grids if g in ("product", "lebedev")))
            if case == "full":
                break
    if model:
        print(f"\nWhole model ({model['config']}, {model['parameters']:,} parameters, {model['formula']}, "
              f"{model['rotations']} random rotations of positions and cell):")
        for dtype in ("float64", "float32"):
            m = model[dtype]
            print(f"  {dtype}: max |F(Rx) - R F(x)| {m['max_force_error']:.2e} eV/A "
                  f"(relative to max |F| = {m['max_abs_force']:.2f}: {m['relative_force_error']:.1e}), "
                  f"max |E(Rx) - E(x)| {m['max_energy_error']:.2e} eV")


def plot(rows, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    panels = [("full", None)] + [("m-truncated", m) for m in dict.fromkeys(r["mmax"] for r in rows
                                                                           if r["case"] == "m-truncated")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), sharey=True, squeeze=False)
    colors = {"product": "tab:red", "product-f32tables": "tab:orange", "product-pytorch": "tab:purple",
              "product-pytorch-f64": "tab:pink",
              "gauss-legendre": "tab:green", "lebedev": "tab:blue"}
    for ax, (case, mmax) in zip(axes[0], panels):
        sel = [r for r in rows if r["case"] == case and (mmax is None or r["mmax"] == mmax)]
        for g in dict.fromkeys(r["grid"] for r in sel):
            pts = sorted((r for r in sel if r["grid"] == g), key=lambda r: r["lmax"])
            for dtype, style in (("float64", "o-"), ("float32", "s--")):
                ax.semilogy([r["lmax"] for r in pts], [max(r[dtype], 1e-17) for r in pts], style, color=colors[g],
                            label=f"{g} {dtype}", alpha=0.85)
        ax.set_title("full coefficients, SO(3) (Table 3)" if case == "full" else f"|m| <= {mmax}, z rotations (Table S-1)")
        ax.set_xlabel("L")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("max equivariance error")
    axes[0][-1].legend(fontsize=7)
    return save_figure(fig, path)


def main():
    args = parse_args()
    host = machine()
    import logging

    logging.getLogger("torch._library").setLevel(logging.ERROR)  # "Triton not available" on CPU wheels
    import scipy

    info = header(host)
    versions = dict(info["versions"], scipy=scipy.__version__)
    try:
        import deepmd

        versions["deepmd-kit"] = deepmd.__version__
        import torch

        versions["torch"] = torch.__version__
    except Exception:
        pass
    print(f"jax {jax.__version__} on {[str(d) for d in jax.devices()]}; {host['cpu']} x{host['cpu_count']}")
    rows = grid_part(args)
    model = None if args.no_model else model_part(args)
    print_tables(rows, model)
    out = Path(args.output)
    png = plot(rows, out.with_suffix(".png"))
    info.update(versions=versions,
                threads={"cpu_affinity": sorted(os.sched_getaffinity(0)), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")},
                rotations=args.rotations, channels=args.channels, seed=args.seed,
                error="max over rotations, coefficients and channels of |f(Da, Db) - D f(a, b)|, a, b ~ N(0, 1)",
                grid_product=rows, model=model, plot=str(png) if png else None)
    write_json(info, out, png)


if __name__ == "__main__":
    main()
