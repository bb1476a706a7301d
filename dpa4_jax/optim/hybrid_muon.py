"""HybridMuon as an optax ``GradientTransformation`` (paper supplement S-2.3/S-2.4).

HybridMuon routes every parameter tensor, once and statically, to one of three
update rules:

* ``"muon"``  - matrix-valued weights: Nesterov momentum, Newton-Schulz
  orthogonalisation per matrix block, match-RMS scale, Magma-lite damping and
  decoupled weight decay (Eq. 74-83);
* ``"adam"``  - biases, norm scales, 1-D tensors and names marked ``adam_*``:
  Adam with bias correction, no weight decay;
* ``"adamw"`` - names marked ``adamw_*`` and tensors without a matrix view in
  the chosen ``muon_mode``: Adam plus decoupled weight decay.

This is a clean-room JAX re-implementation of the behaviour of DeePMD-kit
3.2.0's PyTorch ``HybridMuonOptimizer`` (``deepmd/pt/optimizer/hybrid_muon.py``),
which produced the paper's numbers. Where the paper text and that code differ,
this module follows the code; each such place is marked ``[reference > paper]``.

Sign convention: ``update`` returns *updates* to be added to the parameters
(``optax.apply_updates``), i.e. ``theta_new = theta + updates``.

Precision: the reference iterates the square Newton-Schulz path in bfloat16
and the rectangular Gram path in float16, a GPU-throughput choice. Here both
run in ``promote(dtype, float32)`` by default (float32 for bf16/f32
parameters, float64 for f64), a closer approximation of the polar factor the
iteration aims at; ``ns_dtype`` can force a lower precision. Measured against
the unmodified reference on CPU (float32 parameters, 5 steps), the Muon
parameter changes differ by about 0.5 % (its half-precision rounding); with the
reference's casts switched to float64 the two agree to 1e-15. Adam moments and
Magma scores are kept in ``promote(dtype, float32)`` (the reference: float32).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# --------------------------------------------------------------------------
# Constants (values as in the reference; the paper gives the same ones unless
# noted).
# --------------------------------------------------------------------------

MUON, ADAM, ADAMW = "muon", "adam", "adamw"
MUON_MODES = ("2d", "flat", "slice")

# Eq. 77, two-stage schedule: fast quintic iterations drive the singular values
# into a band around 1, exact Newton iterations then pin them to 1.
NS_COEFF_FAST = (3.4445, -4.7750, 2.0315)
NS_STEPS_FAST = 8
NS_COEFF_POLISH = (2.0, -1.5, 0.5)
NS_STEPS_POLISH = 2
# Guard of the Frobenius normalisation X0 = G / ||G||_F.
NS_EPS = 1e-7

# Rectangular "Gram" path: five Polar-Express (a, b, c) tuples. The reference
# divides them by a safety factor s = 1.05 as (a/s, b/s^3, c/s^5) and restarts
# the Gram accumulation before iteration 2 [reference > paper: the paper names
# Polar-Express but neither the safety factor nor the restart].
POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
)
GRAM_SAFETY_FACTOR = 1.05
POLAR_EXPRESS = tuple(
    (a / GRAM_SAFETY_FACTOR, b / GRAM_SAFETY_FACTOR**3, c / GRAM_SAFETY_FACTOR**5)
    for a, b, c in POLAR_EXPRESS_RAW
)
GRAM_RESTARTS = (2,)

# Adam denominator floor (S-2.3: eps = 1e-20, DeepSeek-V4 style).
ADAM_EPS = 1e-20

# Magma-lite (Eq. 80-83).
MAGMA_TAU = 2.0
MAGMA_EMA_DECAY = 0.9
MAGMA_MIN_SCALE = 0.1
MAGMA_INIT_SCORE = 0.5
# [reference > paper] Eq. 80 writes the cosine as <M,G> / (|M||G| + eps); the
# reference instead clamps the product of norms from below at 1e-12 and then
# clips the cosine to [-1, 1].
MAGMA_EPS = 1e-12


# --------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------


def _key_to_str(key: Any) -> str:
    """One pytree path entry as the string a PyTorch parameter name would hold."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return str(key.name)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_to_name(path: tuple) -> str | None:
    """Dotted name of a pytree path (``("blocks", 0, "bias")`` -> ``"blocks.0.bias"``)."""
    if len(path) == 0:
        return None
    return ".".join(_key_to_str(k) for k in path)


def leaf_name(name: str | None) -> str | None:
    """Last non-numeric dotted segment of ``name``, lower-cased.

    Numeric segments (list indices) are skipped from the right, but the first
    segment is kept even when numeric - the reference's rule.
    """
    if name is None:
        return None
    segments = name.lower().split(".")
    idx = len(segments) - 1
    while idx > 0 and segments[idx].isdigit():
        idx -= 1
    return segments[idx]


def route_by_name(name: str | None) -> str:
    """Name rule: ``b``/``*bias*``/``adam_*`` -> adam, ``adamw_*`` -> adamw, else muon.

    ``"muon"`` here only means "not decided by name": the shape rule comes next.
    """
    leaf = leaf_name(name)
    if leaf is None:
        return MUON
    if leaf == "b" or "bias" in leaf or leaf.startswith("adam_"):
        return ADAM
    if leaf.startswith("adamw_"):
        return ADAMW
    return MUON


def effective_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape without singleton dimensions; ``(1,)`` if every dimension is 1."""
    eff = tuple(int(d) for d in shape if int(d) != 1)
    return eff if eff else (1,)


def matrix_view(eff_shape: tuple[int, ...], muon_mode: str) -> tuple[int, int, int] | None:
    """Muon matrix view ``(B, m, n)`` of an effective shape, or None if it has none.

    * ``"2d"``: rank-2 effective shapes only;
    * ``"flat"``: ``(1, prod(shape[:-1]), shape[-1])``;
    * ``"slice"``: rank 2 -> one matrix; rank >= 3 -> ``B = prod(shape[:-2])``
      independent trailing ``(m, n)`` blocks (Eq. 74).
    """
    if muon_mode not in MUON_MODES:
        raise ValueError(f"muon_mode must be one of {MUON_MODES}, got {muon_mode!r}")
    if len(eff_shape) < 2:
        return None
    if len(eff_shape) == 2:
        return (1, eff_shape[0], eff_shape[1])
    if muon_mode == "2d":
        return None
    if muon_mode == "flat":
        return (1, math.prod(eff_shape[:-1]), eff_shape[-1])
    return (math.prod(eff_shape[:-2]), eff_shape[-2], eff_shape[-1])


def route_leaf(name: str | None, shape: tuple[int, ...], muon_mode: str = "slice") -> str:
    """Route of one tensor: the name rule first, then the effective shape.

    Effective rank < 2 -> adam; no matrix view in ``muon_mode`` -> adamw;
    otherwise muon.
    """
    by_name = route_by_name(name)
    if by_name != MUON:
        return by_name
    eff = effective_shape(shape)
    if len(eff) < 2:
        return ADAM
    if matrix_view(eff, muon_mode) is None:
        return ADAMW
    return MUON


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", np.shape(x)))


def route(params: Any, muon_mode: str = "slice") -> Any:
    """Pytree like ``params`` with ``"muon"``, ``"adam"`` or ``"adamw"`` at each leaf.

    The name of a leaf is its pytree path joined with dots (for Flax parameter
    dicts the dict keys), so ``{"blocks": [{"bias": ...}]}`` is named
    ``"blocks.0.bias"`` exactly like the PyTorch parameter would be.
    """
    matrix_view((), muon_mode)  # validates the mode
    return jax.tree_util.tree_map_with_path(
        lambda path, x: route_leaf(path_to_name(path), _shape_of(x), muon_mode), params
    )


# --------------------------------------------------------------------------
# Orthogonalisation (one (m, n) matrix; batched with jax.vmap)
# --------------------------------------------------------------------------


def _quintic_step(x: jax.Array, a: float, b: float, c: float) -> jax.Array:
    """Eq. 77: X <- a X + (b A + c A^2) X with A = X X^T.  x: (m, n), m <= n."""
    gram = x @ x.T
    return a * x + (b * gram + c * (gram @ gram)) @ x


def newton_schulz(x: jax.Array) -> jax.Array:
    """Two-stage Newton-Schulz polar factor of one wide matrix. x: (m, n), m <= n.

    X0 = X / max(||X||_F, NS_EPS), then 8 fast and 2 polish iterations of Eq. 77.
    """
    x = x / jnp.maximum(jnp.linalg.norm(x), NS_EPS)
    # fori_loop, not a Python loop: one copy of the iteration in the compiled program.
    x = jax.lax.fori_loop(0, NS_STEPS_FAST, lambda _, x: _quintic_step(x, *NS_COEFF_FAST), x)
    return jax.lax.fori_loop(0, NS_STEPS_POLISH, lambda _, x: _quintic_step(x, *NS_COEFF_POLISH), x)


def gram_newton_schulz(x: jax.Array) -> jax.Array:
    """Gram-form Newton-Schulz with Polar-Express coefficients. x: (m, n), m <= n.

    Iterates on the small m x m Gram matrix R = X X^T instead of X:
    with Z_k = b R_k + c R_k^2, X_{k+1} = (a I + Z_k) X_k, so
    R_{k+1} = a (a R_k + R_k Z_k) + Z_k (a R_k + R_k Z_k), and the product
    Q = prod_k (a I + Z_k) is applied to X once at the end. Before each restart
    iteration the accumulated Q is applied to X and R is rebuilt from it (this
    bounds the round-off that accumulates in R).

    [reference > paper] normalisation is X / (||X||_F + NS_EPS) here (the
    square path clamps the norm instead), as in the reference.
    """
    x = x / (jnp.linalg.norm(x) + NS_EPS)
    eye = jnp.eye(x.shape[0], dtype=x.dtype)
    r = x @ x.T
    q = None
    last = len(POLAR_EXPRESS) - 1
    for k, (a, b, c) in enumerate(POLAR_EXPRESS):
        if k in GRAM_RESTARTS and k != 0:
            x = q @ x
            r = x @ x.T
            q = None
        z = b * r + c * (r @ r)
        q = z + a * eye if q is None else a * q + q @ z
        if k < last and (k + 1) not in GRAM_RESTARTS:
            rz = a * r + r @ z
            r = a * rz + z @ rz
    return q @ x


def orthogonalize(u: jax.Array, use_gram: bool) -> jax.Array:
    """Polar factor of every block of ``u``: (B, m, n) -> (B, m, n).

    Tall blocks (m > n) are transposed so the iteration always works on the
    smaller m x m Gram matrix, then transposed back. The blocks are processed
    independently (slice mode, Eq. 74) by ``jax.vmap``.
    """
    tall = u.shape[-2] > u.shape[-1]
    x = jnp.swapaxes(u, -1, -2) if tall else u
    x = jax.vmap(gram_newton_schulz if use_gram else newton_schulz)(x)
    return jnp.swapaxes(x, -1, -2) if tall else x


# --------------------------------------------------------------------------
# Magma-lite (Eq. 80-83)
# --------------------------------------------------------------------------


def magma_raw_score(momentum: jax.Array, grad: jax.Array) -> jax.Array:
    """Alignment score in [0, 1] per block. momentum, grad: (B, k) -> (B,).

    cos = <M, G> / max(|M| |G|, 1e-12), clipped to [-1, 1] (Eq. 80, reference
    form); r = (sigmoid(cos/tau) - sigmoid(-1/tau)) / (sigmoid(1/tau) -
    sigmoid(-1/tau)), clipped to [0, 1] (Eq. 81). The stretch maps the narrow
    sigmoid range [0.38, 0.62] onto [0, 1].
    """
    dot = jnp.sum(momentum * grad, axis=-1)
    norms = jnp.linalg.norm(momentum, axis=-1) * jnp.linalg.norm(grad, axis=-1)
    cosine = jnp.clip(dot / jnp.maximum(norms, MAGMA_EPS), -1.0, 1.0)
    s_lo = 1.0 / (1.0 + math.exp(1.0 / MAGMA_TAU))
    s_hi = 1.0 / (1.0 + math.exp(-1.0 / MAGMA_TAU))
    raw = (jax.nn.sigmoid(cosine / MAGMA_TAU) - s_lo) / (s_hi - s_lo)
    return jnp.clip(raw, 0.0, 1.0)


def magma_update(score: jax.Array, momentum: jax.Array, grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    """EMA of the raw score (Eq. 82) and the damping factor (Eq. 83).

    score: (B,); momentum, grad: (B, k). Returns (new_score, scale), both (B,),
    scale = 0.1 + 0.9 * new_score in [0.1, 1].
    """
    raw = magma_raw_score(momentum, grad)
    new_score = MAGMA_EMA_DECAY * score + (1.0 - MAGMA_EMA_DECAY) * raw
    return new_score, MAGMA_MIN_SCALE + (1.0 - MAGMA_MIN_SCALE) * new_score


# --------------------------------------------------------------------------
# The transformation
# --------------------------------------------------------------------------


class HybridMuonState(NamedTuple):
    """State of ``hybrid_muon``.

    count: int32 scalar, number of updates done (the schedule is read at it).
    mu:    per leaf, Muon momentum buffer (param dtype) or Adam first moment.
    nu:    per leaf, Adam second moment; ``optax.MaskedNode()`` on Muon leaves.
    score: per leaf, Magma-lite EMA score of shape (B,) on Muon leaves (when
           Magma-lite is on); ``optax.MaskedNode()`` elsewhere.
    """

    count: jax.Array
    mu: Any
    nu: Any
    score: Any


def _state_dtype(dtype: Any) -> Any:
    """Accumulator dtype: at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def _muon_view(shape: tuple[int, ...], muon_mode: str) -> tuple[int, int, int]:
    view = matrix_view(effective_shape(shape), muon_mode)
    if view is None:
        raise ValueError(f"a tensor of shape {shape} has no Muon matrix view in mode {muon_mode!r}")
    return view


def _lerp(start: jax.Array, end: jax.Array, weight: float) -> jax.Array:
    """start + weight * (end - start), as torch.lerp."""
    return start + weight * (end - start)


def hybrid_muon(
    learning_rate: float | optax.Schedule,
    momentum: float = 0.95,
    adam_betas: tuple[float, float] = (0.9, 0.95),
    eps: float = ADAM_EPS,
    weight_decay: float = 1e-3,
    muon_mode: str = "slice",
    magma_lite: bool = True,
    lr_adjust: float = 0.0,
    lr_adjust_coeff: float = 0.18,
    enable_gram: bool = True,
    ns_dtype: Any = None,
    routing: Any = None,
) -> optax.GradientTransformation:
    """HybridMuon (paper S-2.3/S-2.4) with the reference's defaults.

    Args:
      learning_rate: float, or an optax schedule read at the update count
        (0 for the first update, as the reference's LambdaLR does).
      momentum: Muon momentum beta (Eq. 75-76).
      adam_betas: (beta1, beta2) of the Adam/AdamW routes.
      eps: Adam denominator floor, added to sqrt(v_hat).
      weight_decay: decoupled decay on the Muon and AdamW routes (not Adam).
      muon_mode: "slice" (default), "2d" or "flat"; see ``matrix_view``.
      magma_lite: Magma-lite damping of the Muon updates (Eq. 80-83).
      lr_adjust: <= 0 (default) selects match-RMS scaling
        ``lr_adjust_coeff * sqrt(max(m, n))`` (Eq. 79); > 0 selects
        ``sqrt(max(1, m/n))`` and Adam learning rate ``lr / lr_adjust``.
      lr_adjust_coeff: gamma of Eq. 79.
      enable_gram: rectangular blocks use the Gram/Polar-Express path; square
        blocks always use the two-stage Newton-Schulz path (reference default:
        on).
      ns_dtype: dtype of the orthogonalisation iterations; None means
        ``promote(update dtype, float32)`` (see the module docstring).
      routing: pytree of route strings like ``route(params, muon_mode)``; by
        default it is derived from the parameter/gradient pytree's paths and
        shapes (static, so it is recomputed identically at every trace).

    Returns:
      An ``optax.GradientTransformation``. ``update(grads, state, params)``
      needs ``params`` whenever ``weight_decay != 0``.
    """
    if muon_mode not in MUON_MODES:
        raise ValueError(f"muon_mode must be one of {MUON_MODES}, got {muon_mode!r}")
    beta1, beta2 = adam_betas

    def lr_at(count: jax.Array) -> jax.Array:
        return jnp.asarray(learning_rate(count) if callable(learning_rate) else learning_rate)

    def routes_for(tree: Any) -> Any:
        return routing if routing is not None else route(tree, muon_mode)

    def init_fn(params: Any) -> HybridMuonState:
        routes = routes_for(params)

        def init_mu(r, p):
            # Muon momentum follows the gradient dtype; Adam moments >= float32.
            return jnp.zeros(p.shape, p.dtype if r == MUON else _state_dtype(p.dtype))

        def init_nu(r, p):
            return optax.MaskedNode() if r == MUON else jnp.zeros(p.shape, _state_dtype(p.dtype))

        def init_score(r, p):
            if r != MUON or not magma_lite:
                return optax.MaskedNode()
            blocks = _muon_view(p.shape, muon_mode)[0]
            return jnp.full((blocks,), MAGMA_INIT_SCORE, _state_dtype(p.dtype))

        tmap = jax.tree_util.tree_map
        return HybridMuonState(
            count=jnp.zeros([], jnp.int32),
            mu=tmap(init_mu, routes, params),
            nu=tmap(init_nu, routes, params),
            score=tmap(init_score, routes, params),
        )

    def adam_leaf(g, m, v, p, t, lr, decay):
        """Adam(W) for one tensor. Returns (update, m, v); t = step number (1-based)."""
        sd = m.dtype
        gs = g.astype(sd)
        m = _lerp(m, gs, 1.0 - beta1)
        v = _lerp(v, gs * gs, 1.0 - beta2)
        adam_lr = lr if lr_adjust <= 0 else lr / lr_adjust
        bias_corr1 = 1.0 - beta1 ** t.astype(sd)
        bias_corr2 = 1.0 - beta2 ** t.astype(sd)
        denom = jnp.sqrt(v / bias_corr2) + eps
        upd = -(adam_lr / bias_corr1) * (m / denom)
        if decay and weight_decay != 0.0:
            # theta <- theta * (1 - lr*wd) + upd, written as an additive update.
            upd = upd - adam_lr * weight_decay * p.astype(sd)
        return upd.astype(p.dtype if p is not None else g.dtype), m, v

    def muon_leaf(g, buf, score, p, lr):
        """Muon for one tensor. Returns (update, buf, score).

        g, buf, p: the parameter's shape; viewed as (B, m, n) blocks.
        """
        shape = g.shape
        blocks, rows, cols = _muon_view(shape, muon_mode)
        g = g.astype(buf.dtype)
        # Eq. 75-76, Nesterov as the reference writes it:
        # m <- lerp(m, g, 1 - beta); u = lerp(g, m, beta).
        buf = _lerp(buf, g, 1.0 - momentum)
        u = _lerp(g, buf, momentum)

        cdt = _state_dtype(g.dtype) if ns_dtype is None else ns_dtype
        wdt = _state_dtype(g.dtype)
        x = u.reshape(blocks, rows, cols).astype(wdt)
        if ns_dtype is not None:
            # Normalise in >= float32 before dropping precision (reference Gram path).
            x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + NS_EPS)
        orth = orthogonalize(x.astype(cdt), use_gram=enable_gram and rows != cols).astype(wdt)

        # Eq. 79: match-RMS scale (or the rectangular correction if lr_adjust > 0).
        if lr_adjust <= 0:
            scale = lr_adjust_coeff * math.sqrt(max(rows, cols))
        else:
            scale = math.sqrt(max(1.0, rows / cols))
        orth = orth * scale

        if magma_lite:
            # Eq. 80: the reference uses the momentum buffer m_t of Eq. 75 (the
            # paper says "after the update in Eq. (76)", which is the same buffer).
            score, damp = magma_update(
                score,
                buf.reshape(blocks, rows * cols).astype(score.dtype),
                g.reshape(blocks, rows * cols).astype(score.dtype),
            )
            orth = orth * damp.astype(wdt)[:, None, None]

        upd = -lr * orth.reshape(shape)
        if weight_decay != 0.0:
            # The reference decays theta <- theta*(1 - lr*wd) first, then adds
            # -lr*scale*orth: the same sum, written as one additive update.
            upd = upd - lr * weight_decay * p.astype(wdt)
        return upd.astype(p.dtype if p is not None else g.dtype), buf, score

    def update_fn(updates: Any, state: HybridMuonState, params: Any = None):
        if weight_decay != 0.0 and params is None:
            raise ValueError("hybrid_muon needs params for weight decay (pass params to update)")
        routes = routes_for(updates)
        count_inc = optax.safe_int32_increment(state.count)
        lr = lr_at(state.count)
        params_tree = params if params is not None else jax.tree_util.tree_map(lambda _: None, routes)

        def one_leaf(r, g, m, v, s, p):
            if r == MUON:
                return muon_leaf(g, m, s, p, lr.astype(_state_dtype(g.dtype)))
            if r in (ADAM, ADAMW):
                upd, m, v = adam_leaf(g, m, v, p, count_inc, lr.astype(m.dtype), decay=(r == ADAMW))
                return upd, m, v
            raise ValueError(f"unknown route {r!r}")

        out = jax.tree_util.tree_map(
            one_leaf, routes, updates, state.mu, state.nu, state.score, params_tree,
            is_leaf=lambda x: x is None,
        )

        def pick(i):
            return jax.tree_util.tree_map(lambda _, o: o[i], routes, out)

        new_updates = pick(0)
        new_mu = pick(1)
        # Output slot 2 is the Adam second moment on Adam leaves and the Magma
        # score on Muon leaves; put each back where it belongs.
        slot2 = pick(2)
        tmap = jax.tree_util.tree_map
        new_nu = tmap(lambda r, o, old: old if r == MUON else o, routes, slot2, state.nu)
        new_score = tmap(lambda r, o, old: o if r == MUON else old, routes, slot2, state.score)
        return new_updates, HybridMuonState(count=count_inc, mu=new_mu, nu=new_nu, score=new_score)

    return optax.GradientTransformation(init_fn, update_fn)
