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

import dataclasses
import functools
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


@dataclasses.dataclass(frozen=True)
class _HyperParams:
    """The validated arguments of ``hybrid_muon`` (see its docstring for each)."""

    learning_rate: float | optax.Schedule
    momentum: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    muon_mode: str
    magma_lite: bool
    lr_adjust: float
    lr_adjust_coeff: float
    enable_gram: bool
    ns_dtype: Any
    routing: Any

    def lr_at(self, count: jax.Array) -> jax.Array:
        """Learning rate (scalar array) of the update that follows ``count`` updates."""
        lr = self.learning_rate
        return jnp.asarray(lr(count) if callable(lr) else lr)

    def routes_for(self, tree: Any) -> Any:
        """Route pytree of ``tree``: ``routing`` if given, else ``route(tree, muon_mode)``."""
        return self.routing if self.routing is not None else route(tree, self.muon_mode)


# --------------------------------------------------------------------------
# State initialisation
# --------------------------------------------------------------------------


def _init_mu(leaf_route: str, param: jax.Array) -> jax.Array:
    """Zero Muon momentum buffer or Adam first moment, shaped like ``param``."""
    # Muon momentum follows the gradient dtype; Adam moments >= float32.
    return jnp.zeros(param.shape, param.dtype if leaf_route == MUON else _state_dtype(param.dtype))


def _init_nu(leaf_route: str, param: jax.Array) -> Any:
    """Zero Adam second moment shaped like ``param``; ``MaskedNode`` on Muon leaves."""
    if leaf_route == MUON:
        return optax.MaskedNode()
    return jnp.zeros(param.shape, _state_dtype(param.dtype))


def _init_score(hp: _HyperParams, leaf_route: str, param: jax.Array) -> Any:
    """Magma-lite scores, (B,) filled with MAGMA_INIT_SCORE, on Muon leaves; else ``MaskedNode``."""
    if leaf_route != MUON or not hp.magma_lite:
        return optax.MaskedNode()
    blocks = _muon_view(param.shape, hp.muon_mode)[0]
    return jnp.full((blocks,), MAGMA_INIT_SCORE, _state_dtype(param.dtype))


def _init_state(hp: _HyperParams, params: Any) -> HybridMuonState:
    """``init`` of ``hybrid_muon``: count 0, zero moments, initial Magma scores."""
    routes = hp.routes_for(params)
    tmap = jax.tree_util.tree_map
    return HybridMuonState(
        count=jnp.zeros([], jnp.int32),
        mu=tmap(_init_mu, routes, params),
        nu=tmap(_init_nu, routes, params),
        score=tmap(functools.partial(_init_score, hp), routes, params),
    )


# --------------------------------------------------------------------------
# Per-leaf update rules
# --------------------------------------------------------------------------


def _adam_leaf(hp: _HyperParams, grad, mu, nu, param, count, lr, decay: bool):
    """Adam(W) for one tensor. Returns (update, mu, nu).

    grad, param: the parameter's shape (param may be None without weight decay);
    mu, nu: first and second moments, same shape, dtype >= float32;
    count: int32 step number (1-based); lr: scalar in the moments' dtype;
    decay: AdamW route (decoupled weight decay).
    """
    moment_dtype = mu.dtype
    g = grad.astype(moment_dtype)
    mu = _lerp(mu, g, 1.0 - hp.beta1)
    nu = _lerp(nu, g * g, 1.0 - hp.beta2)
    adam_lr = lr if hp.lr_adjust <= 0 else lr / hp.lr_adjust
    bias_corr1 = 1.0 - hp.beta1 ** count.astype(moment_dtype)
    bias_corr2 = 1.0 - hp.beta2 ** count.astype(moment_dtype)
    denom = jnp.sqrt(nu / bias_corr2) + hp.eps
    upd = -(adam_lr / bias_corr1) * (mu / denom)
    if decay and hp.weight_decay != 0.0:
        # theta <- theta * (1 - lr*wd) + upd, written as an additive update.
        upd = upd - adam_lr * hp.weight_decay * param.astype(moment_dtype)
    return upd.astype(param.dtype if param is not None else grad.dtype), mu, nu


def _orthogonal_blocks(hp: _HyperParams, blocks: jax.Array) -> jax.Array:
    """Polar factor of each block (Eq. 77). blocks: (B, m, n) -> (B, m, n), same dtype.

    The iterations run in ``ns_dtype`` if set, else in the dtype of ``blocks``.
    """
    work_dtype = blocks.dtype
    if hp.ns_dtype is not None:
        # Normalise in >= float32 before dropping precision (reference Gram path).
        blocks = blocks / (jnp.linalg.norm(blocks, axis=(-2, -1), keepdims=True) + NS_EPS)
    rows, cols = blocks.shape[-2:]
    iter_dtype = work_dtype if hp.ns_dtype is None else hp.ns_dtype
    orth = orthogonalize(blocks.astype(iter_dtype), use_gram=hp.enable_gram and rows != cols)
    return orth.astype(work_dtype)


def _muon_scale(hp: _HyperParams, rows: int, cols: int) -> float:
    """Eq. 79: match-RMS scale (or the rectangular correction if lr_adjust > 0)."""
    if hp.lr_adjust <= 0:
        return hp.lr_adjust_coeff * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def _muon_leaf(hp: _HyperParams, grad, buf, score, param, lr):
    """Muon for one tensor (Eq. 74-83). Returns (update, buf, score).

    grad, buf, param: the parameter's shape, viewed as (B, m, n) blocks (param
    may be None without weight decay); score: (B,), or ``MaskedNode`` when
    Magma-lite is off; lr: scalar in ``promote(dtype, float32)``.
    """
    shape = grad.shape
    blocks, rows, cols = _muon_view(shape, hp.muon_mode)
    grad = grad.astype(buf.dtype)
    # Eq. 75-76, Nesterov as the reference writes it:
    # m <- lerp(m, g, 1 - beta); u = lerp(g, m, beta).
    buf = _lerp(buf, grad, 1.0 - hp.momentum)
    nesterov = _lerp(grad, buf, hp.momentum)

    work_dtype = _state_dtype(grad.dtype)
    orth = _orthogonal_blocks(hp, nesterov.reshape(blocks, rows, cols).astype(work_dtype))
    orth = orth * _muon_scale(hp, rows, cols)
    if hp.magma_lite:
        # Eq. 80: the reference uses the momentum buffer m_t of Eq. 75 (the
        # paper says "after the update in Eq. (76)", which is the same buffer).
        score, damp = magma_update(
            score,
            buf.reshape(blocks, rows * cols).astype(score.dtype),
            grad.reshape(blocks, rows * cols).astype(score.dtype),
        )
        orth = orth * damp.astype(work_dtype)[:, None, None]

    upd = -lr * orth.reshape(shape)
    if hp.weight_decay != 0.0:
        # The reference decays theta <- theta*(1 - lr*wd) first, then adds
        # -lr*scale*orth: the same sum, written as one additive update.
        upd = upd - lr * hp.weight_decay * param.astype(work_dtype)
    return upd.astype(param.dtype if param is not None else grad.dtype), buf, score


# --------------------------------------------------------------------------
# The update over the pytree
# --------------------------------------------------------------------------


class _LeafStep(NamedTuple):
    """One leaf's result of an update: its parameter update and its new state.

    nu and score keep their incoming value (``optax.MaskedNode()``) where the
    leaf's route has no such slot: nu on Muon leaves, score on Adam(W) leaves.
    """

    update: jax.Array
    mu: jax.Array
    nu: Any
    score: Any


def _leaf_step(hp: _HyperParams, lr, count, leaf_route: str, grad, mu, nu, score, param) -> _LeafStep:
    """One leaf through the rule of its route. lr: scalar; count: 1-based step number."""
    if leaf_route == MUON:
        update, mu, score = _muon_leaf(hp, grad, mu, score, param, lr.astype(_state_dtype(grad.dtype)))
    elif leaf_route in (ADAM, ADAMW):
        update, mu, nu = _adam_leaf(
            hp, grad, mu, nu, param, count, lr.astype(mu.dtype), decay=(leaf_route == ADAMW)
        )
    else:
        raise ValueError(f"unknown route {leaf_route!r}")
    return _LeafStep(update, mu, nu, score)


def _step_field(routes: Any, steps: Any, name: str) -> Any:
    """Pytree of one ``_LeafStep`` field; ``steps`` holds a ``_LeafStep`` at each leaf of ``routes``."""
    return jax.tree_util.tree_map(lambda _, step: getattr(step, name), routes, steps)


def _update(hp: _HyperParams, updates: Any, state: HybridMuonState, params: Any = None):
    """``update`` of ``hybrid_muon``: gradients in, ``(additive updates, new state)`` out."""
    if hp.weight_decay != 0.0 and params is None:
        raise ValueError("hybrid_muon needs params for weight decay (pass params to update)")
    routes = hp.routes_for(updates)
    count = optax.safe_int32_increment(state.count)
    step = functools.partial(_leaf_step, hp, hp.lr_at(state.count), count)
    if params is None:
        params = jax.tree_util.tree_map(lambda _: None, routes)
    # is_leaf: a None in a user-given routing is reported as an unknown route.
    steps = jax.tree_util.tree_map(
        step, routes, updates, state.mu, state.nu, state.score, params, is_leaf=lambda x: x is None
    )
    new_state = HybridMuonState(
        count=count,
        mu=_step_field(routes, steps, "mu"),
        nu=_step_field(routes, steps, "nu"),
        score=_step_field(routes, steps, "score"),
    )
    return _step_field(routes, steps, "update"), new_state


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
    hp = _HyperParams(
        learning_rate=learning_rate,
        momentum=momentum,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        muon_mode=muon_mode,
        magma_lite=magma_lite,
        lr_adjust=lr_adjust,
        lr_adjust_coeff=lr_adjust_coeff,
        enable_gram=enable_gram,
        ns_dtype=ns_dtype,
        routing=routing,
    )
    return optax.GradientTransformation(functools.partial(_init_state, hp), functools.partial(_update, hp))
