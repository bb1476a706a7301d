"""The training objective (paper Eq. 43) and error metrics on padded batches."""

from __future__ import annotations

import jax.numpy as jnp
import jraph

from dpa4_jax.config import LossConfig


def _masks(graph: jraph.GraphsTuple):
    graphs = jraph.get_graph_padding_mask(graph)
    nodes = jraph.get_node_padding_mask(graph)
    return (graphs & graph.globals["energy_mask"], nodes & graph.nodes["force_mask"],
            graphs & graph.globals["virial_mask"])


def error_sums(out: dict, graph: jraph.GraphsTuple) -> dict[str, jnp.ndarray]:
    """Sums of errors and their counts over the real structures of a batch (to accumulate over batches).

    ``energy_*``: per-atom energy errors (eV/atom); ``force_*``: force components (eV/A),
    ``force_norm``: force-vector error norms; ``virial_*``: virial components per atom (eV/atom);
    ``stress_*``: stress components (eV/A^3) of periodic structures with a virial label.
    """
    e_mask, f_mask, v_mask = _masks(graph)
    n_atoms = jnp.maximum(graph.n_node, 1).astype(out["energy"].dtype)
    de = jnp.where(e_mask, (out["energy"] - graph.globals["energy"]) / n_atoms, 0.0)
    df = jnp.where(f_mask[:, None], out["forces"] - graph.nodes["forces"], 0.0)
    dv = jnp.where(v_mask[:, None, None], (out["virial"] - graph.globals["virial"]) / n_atoms[:, None, None], 0.0)
    norm2 = jnp.sum(df * df, axis=-1)
    volume = jnp.abs(jnp.linalg.det(graph.globals["cell"].astype(dv.dtype)))
    s_mask = v_mask & (volume > 0)
    ds = jnp.where(s_mask[:, None, None], (out["virial"] - graph.globals["virial"])
                   / jnp.where(s_mask, volume, 1.0)[:, None, None], 0.0)  # stress error up to sign, eV/A^3
    return {
        **difference_sums(de, df, ds),
        "energy_n": jnp.sum(e_mask), "force_n": 3 * jnp.sum(f_mask), "stress_n": 9 * jnp.sum(s_mask),
        # sqrt with a safe argument: the gradient of |x| at exactly 0 (padding atoms) would be NaN.
        "force_norm": jnp.sum(jnp.where(f_mask, jnp.sqrt(jnp.where(f_mask, norm2, 1.0)), 0.0)),
        "virial_abs": jnp.sum(jnp.abs(dv)), "virial_sq": jnp.sum(dv * dv), "virial_n": 9 * jnp.sum(v_mask),
    }


def difference_sums(de, df, ds) -> dict:
    """Sums of absolute and of squared errors: ``energy_*`` of per-atom energies ``de`` (eV/atom),
    ``force_*`` of force components ``df`` (eV/A), ``stress_*`` of stress components ``ds`` (eV/A^3), each
    zero where there is no label. NumPy or JAX arrays (operators and ``.sum()`` only): the batched training
    metrics and the per-frame errors of ``dpa4_jax.evaluate`` share it."""
    return {f"{key}_{kind}": value for key, d in (("energy", de), ("force", df), ("stress", ds))
            for kind, value in (("abs", abs(d).sum()), ("sq", (d * d).sum()))}


def label_counts(graph: jraph.GraphsTuple) -> dict[str, jnp.ndarray]:
    """How many structures carry an energy and a virial label, and how many atoms carry forces."""
    e_mask, f_mask, v_mask = _masks(graph)
    return {"energy_n": jnp.sum(e_mask), "force_atoms": jnp.sum(f_mask), "virial_n": 9 * jnp.sum(v_mask)}


def loss(out: dict, graph: jraph.GraphsTuple, weights: LossConfig, counts: dict | None = None):
    """Eq. 43: ``w_E mean_b |dE_b|/N_b + w_F mean_i |dF_i| + w_V mean_b (|dW_b|_1 / 9) / N_b``.

    Each term averages over the structures (atoms) that carry that label; a term
    with no labels contributes zero. ``counts`` (:func:`label_counts`) are the
    denominators: those of the whole global batch when ``graph`` is one of its
    sub-batches, so that the sub-batch losses add up to the global batch's.
    Returns ``(loss, error sums)``.
    """
    s = error_sums(out, graph)
    counts = label_counts(graph) if counts is None else counts
    total = (weights.energy * s["energy_abs"] / jnp.maximum(counts["energy_n"], 1)
             + weights.forces * s["force_norm"] / jnp.maximum(counts["force_atoms"], 1)
             + weights.virial * s["virial_abs"] / jnp.maximum(counts["virial_n"], 1))
    return total, s


def summarize(sums: dict) -> dict[str, float]:
    """MAE and RMSE from accumulated :func:`error_sums`, in meV/atom, meV/A and GPa (NaN without labels)."""
    from ase.units import GPa

    def stat(key, scale):
        n = float(sums[f"{key}_n"])
        if n == 0:
            return float("nan"), float("nan")
        return scale * float(sums[f"{key}_abs"]) / n, scale * (float(sums[f"{key}_sq"]) / n) ** 0.5

    out = {}
    for key, scale, unit in (("energy", 1e3, "meV/atom"), ("force", 1e3, "meV/A"), ("stress", 1 / GPa, "GPa")):
        out[f"{key}_mae"], out[f"{key}_rmse"] = stat(key, scale)
    return out
