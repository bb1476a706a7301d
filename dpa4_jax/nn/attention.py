"""A3: envelope-gated attention aggregation with a learned null logit (paper Eq. 25-30)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def envelope_gated_softmax(logits, edge_env, receivers, n_nodes, z_raw, eps, source_gate=None):
    """Attention weights ``alpha_e`` normalised over the incoming edges of each node.

    ::

        alpha_e = w_e exp(logit_e) / (softplus(z) + eps + sum_{e' -> i} w_e' exp(logit_e'))
        w_e = env_e^2 * eta_src(e)

    The envelope makes a neighbour's weight vanish smoothly at the cutoff, and the
    null mass ``softplus(z)`` lets a node attend to nothing, so the aggregate goes
    smoothly to zero as its last neighbour leaves (no renormalisation jump).
    Computed in log space with a per-node maximum that includes the null logit.

    Args:
      logits: ``(E, F, H)`` attention logits.
      edge_env: ``(E,)`` envelope, exactly 0 on padding edges (they get weight 0).
      receivers: ``(E,)`` destination node of every edge.
      n_nodes: N.
      z_raw: ``(F, H)`` raw null-logit parameter.
      eps: added to the null mass.
      source_gate: optional ``(E,)`` source-freeze gate (ZBL bridging).

    Returns:
      ``(E, F, H)`` weights.
    """
    active = edge_env > 0.0
    log_w = 2.0 * jnp.log(jnp.where(active, edge_env, 1.0))
    gate_ratio = None
    if source_gate is not None:
        # As in the reference: the gate's value enters in log space (no gradient),
        # its gradient through a factor that equals one.
        positive = source_gate > 0.0
        fixed = jax.lax.stop_gradient(jnp.where(positive, source_gate, 1.0))
        log_w = log_w + jnp.log(fixed)
        gate_ratio = jnp.where(positive, source_gate / fixed, 0.0)
        active = active & positive
    scores = jnp.where(active[:, None, None], logits + log_w[:, None, None], -jnp.inf)
    null_logit = jnp.log(jax.nn.softplus(z_raw) + eps)  # (F, H)
    node_max = jnp.maximum(jax.ops.segment_max(scores, receivers, n_nodes), null_logit)
    node_max = jax.lax.stop_gradient(node_max)  # any shift gives the same weights
    edge_exp = jnp.exp(scores - node_max[receivers])
    if gate_ratio is not None:
        edge_exp = edge_exp * gate_ratio[:, None, None]
    denominator = jax.ops.segment_sum(edge_exp, receivers, n_nodes) + jnp.exp(null_logit - node_max)
    return edge_exp / denominator[receivers]
