"""Tests of dpa4_jax.optim: HybridMuon routing and updates, and the WSD schedule.

The HybridMuon checks compare with an independent NumPy implementation of the
paper's Eq. 74-83 written below with plain loops (one matrix block at a time).
It shares no code with the module. Its Gram path is the direct iteration
X <- a X + (b A + c A^2) X with the Polar-Express coefficients, which equals the
module's Gram-matrix formulation (accumulated Q, restart) in exact arithmetic,
so the comparison also checks that algebra.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpa4_jax.optim import PAPER_WSD, hybrid_muon, route, wsd_schedule


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# ---------------------------------------------------------------------------
# Independent NumPy model of HybridMuon (Eq. 74-83, reference conventions)
# ---------------------------------------------------------------------------

FAST = (3.4445, -4.7750, 2.0315)
POLISH = (2.0, -1.5, 0.5)
PE_RAW = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
]


def np_polar(mat, gram):
    """Polar factor of one (m, n) matrix by plain Newton-Schulz iterations."""
    x = mat.T.copy() if mat.shape[0] > mat.shape[1] else mat.copy()
    fro = math.sqrt(float(np.sum(x * x)))
    if gram:
        x = x / (fro + 1e-7)
        coeffs = [(a / 1.05, b / 1.05**3, c / 1.05**5) for a, b, c in PE_RAW]
    else:
        x = x / max(fro, 1e-7)
        coeffs = [FAST] * 8 + [POLISH] * 2
    for a, b, c in coeffs:
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if mat.shape[0] > mat.shape[1] else x


def np_sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def np_blocks(shape, mode):
    """(B, m, n) view of a shape after squeezing ones, or None (written from the spec)."""
    eff = [d for d in shape if d != 1] or [1]
    if len(eff) < 2:
        return None
    if len(eff) == 2:
        return (1, eff[0], eff[1])
    if mode == "2d":
        return None
    if mode == "flat":
        return (1, int(np.prod(eff[:-1])), eff[-1])
    return (int(np.prod(eff[:-2])), eff[-2], eff[-1])


class NumpyHybridMuon:
    """Plain-loop HybridMuon on a flat {name: array} dict with given routes."""

    def __init__(self, params, routes, lr_fn, mode="slice", gram=True, wd=1e-3, magma=True,
                 beta=0.95, betas=(0.9, 0.95), eps=1e-20, coeff=0.18):
        self.p = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
        self.routes, self.lr_fn, self.mode, self.gram = routes, lr_fn, mode, gram
        self.wd, self.magma, self.beta, self.betas, self.eps, self.coeff = wd, magma, beta, betas, eps, coeff
        self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.score = {}
        self.t = 0

    def step(self, grads):
        lr = self.lr_fn(self.t)  # schedule read at the number of previous steps
        self.t += 1
        for name, g in grads.items():
            g = np.asarray(g, np.float64)
            if self.routes[name] == "muon":
                self._muon(name, g, lr)
            else:
                self._adam(name, g, lr, decay=self.routes[name] == "adamw")

    def _adam(self, name, g, lr, decay):
        b1, b2 = self.betas
        self.m[name] = b1 * self.m[name] + (1 - b1) * g
        self.v[name] = b2 * self.v[name] + (1 - b2) * g * g
        mhat = self.m[name] / (1 - b1**self.t)
        vhat = self.v[name] / (1 - b2**self.t)
        p = self.p[name]
        if decay:
            p = p * (1 - lr * self.wd)
        self.p[name] = p - lr * mhat / (np.sqrt(vhat) + self.eps)

    def _muon(self, name, g, lr):
        B, rows, cols = np_blocks(g.shape, self.mode)
        self.m[name] = self.beta * self.m[name] + (1 - self.beta) * g  # Eq. 75
        u = self.beta * self.m[name] + (1 - self.beta) * g  # Eq. 76
        ub = u.reshape(B, rows, cols)
        mb = self.m[name].reshape(B, rows * cols)
        gb = g.reshape(B, rows * cols)
        if name not in self.score:
            self.score[name] = [0.5] * B
        delta = np.zeros((B, rows, cols))
        s_lo, s_hi = np_sigmoid(-0.5), np_sigmoid(0.5)
        for b in range(B):
            q = np_polar(ub[b], self.gram and rows != cols)
            scale = self.coeff * math.sqrt(max(rows, cols))  # Eq. 79
            damp = 1.0
            if self.magma:  # Eq. 80-83 (reference: clamp on the norm product)
                cos = float(mb[b] @ gb[b]) / max(np.linalg.norm(mb[b]) * np.linalg.norm(gb[b]), 1e-12)
                cos = min(1.0, max(-1.0, cos))
                raw = min(1.0, max(0.0, (np_sigmoid(cos / 2) - s_lo) / (s_hi - s_lo)))
                self.score[name][b] = 0.9 * self.score[name][b] + 0.1 * raw
                damp = 0.1 + 0.9 * self.score[name][b]
            delta[b] = scale * damp * q
        self.p[name] = self.p[name] * (1 - lr * self.wd) - lr * delta.reshape(g.shape)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def nest(flat):
    """{"a.b.c": x} -> {"a": {"b": {"c": x}}}."""
    out = {}
    for key, val in flat.items():
        d = out
        parts = key.split(".")
        for part in parts[:-1]:
            d = d.setdefault(part, {})
        d[parts[-1]] = val
    return out


def flatten(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(str(k.key) for k in path): v for path, v in leaves}


SHAPES = {
    "blk.square.weight": (6, 6),
    "blk.wide.matrix": (4, 9),
    "blk.tall.weight": (10, 3),
    "blk.weight_m0": (3, 4, 7),  # slice mode: 3 blocks of 4x7
    "blk.tall3": (2, 9, 5),  # slice mode: 2 tall blocks
    "blk.sq3": (2, 1, 5, 5),  # singleton dim squeezed: 2 square blocks
    "blk.bias": (6,),
    "adam_scale": (1, 8),
    "adamw_attn_logit_w": (4, 3),
}


def make_problem(seed, n_steps):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    base = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    grads = []
    for t in range(n_steps):
        # A persistent direction whose sign flips at step 2 plus noise: cosines
        # of momentum and gradient go from ~1 to negative (exercises Magma).
        sign = -1.0 if t == 2 else 1.0
        grads.append({k: sign * base[k] + 0.7 * rng.normal(size=s) for k, s in SHAPES.items()})
    return params, grads


def lr_fn(t):
    return 2e-2 * (1.0 + 0.5 * t)


# ---------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------


def test_route_rules():
    z = jnp.zeros
    params = {
        "layer": {
            "weight": z((4, 6)),  # matrix -> muon
            "bias": z((6,)),  # name bias -> adam
            "b": z((4, 4)),  # name exactly "b", even as a matrix -> adam
            "Out_Bias_Term": z((3, 3)),  # contains "bias" (case-insensitive) -> adam
            "ADAM_gain": z((5, 5)),  # adam_ prefix -> adam
            "adamw_attn_logit_w": z((4, 1)),  # adamw_ prefix -> adamw
            "adamw_attn_z_bias_raw": z((4,)),  # "bias" rule comes before adamw_ -> adam
            "adamw_scale": z((7,)),  # adamw_ on a 1-D tensor -> adamw
            "bx": z((3, 3)),  # not exactly "b" -> by shape -> muon
        },
        "row": z((1, 8)),  # effective 1-D -> adam
        "ones": z((1, 1)),  # effective (1,) -> adam
        "scalar": z(()),  # rank 0 -> adam
        "matrix": z((1, 4, 1, 6)),  # effective (4, 6) -> muon
        "weight3": z((2, 3, 4)),  # slice -> muon
        "adam_freqs": [z((5, 5)), z((5,))],  # numeric keys skipped: leaf adam_freqs -> adam
        "stack": [z((3, 3)), z((3,))],  # leaf "stack": by shape
    }
    expected = {
        "layer": {
            "weight": "muon", "bias": "adam", "b": "adam", "Out_Bias_Term": "adam",
            "ADAM_gain": "adam", "adamw_attn_logit_w": "adamw", "adamw_attn_z_bias_raw": "adam",
            "adamw_scale": "adamw", "bx": "muon",
        },
        "row": "adam", "ones": "adam", "scalar": "adam", "matrix": "muon", "weight3": "muon",
        "adam_freqs": ["adam", "adam"], "stack": ["muon", "adam"],
    }
    assert route(params) == expected
    # Modes: rank-3 tensors have no matrix view in "2d" (-> adamw); "flat" keeps muon.
    assert route(params, "2d")["weight3"] == "adamw"
    assert route(params, "2d")["matrix"] == "muon"
    assert route(params, "flat")["weight3"] == "muon"
    # A bare top-level list: the name is only a numeric index -> shape decides.
    assert route([z((3,)), z((2, 2))]) == ["adam", "muon"]
    with pytest.raises(ValueError):
        route(params, "bogus")


def test_explicit_routing_overrides(x64):
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)))}
    grads = {"w": jnp.ones((4, 4))}
    tx = hybrid_muon(1e-2, routing={"w": "adam"}, weight_decay=0.0)
    upd, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step moves every entry by exactly lr (m_hat / sqrt(v_hat) = sign(g)).
    np.testing.assert_allclose(np.asarray(upd["w"]), -1e-2 * np.ones((4, 4)), rtol=1e-12)


# ---------------------------------------------------------------------------
# HybridMuon against the NumPy model
# ---------------------------------------------------------------------------


def run_both(mode, gram, magma, wd, dtype, n_steps=4, seed=0, jit=True):
    params, grads = make_problem(seed, n_steps)
    routes = flatten(route(nest(params), mode))
    ref = NumpyHybridMuon(params, routes, lr_fn, mode=mode, gram=gram, wd=wd, magma=magma)
    tx = hybrid_muon(lambda c: lr_fn(c), weight_decay=wd, muon_mode=mode, enable_gram=gram, magma_lite=magma)
    jp = nest({k: jnp.asarray(v, dtype) for k, v in params.items()})
    state = tx.init(jp)
    update = jax.jit(tx.update) if jit else tx.update
    for g in grads:
        ref.step(g)
        upd, state = update(nest({k: jnp.asarray(v, dtype) for k, v in g.items()}), state, jp)
        jp = optax.apply_updates(jp, upd)
    out = flatten(jp)
    return params, ref.p, out, routes


@pytest.mark.parametrize("mode,gram", [("slice", True), ("slice", False), ("flat", True), ("2d", True)])
def test_hybrid_muon_matches_numpy_float64(x64, mode, gram):
    params, ref, out, routes = run_both(mode, gram, magma=True, wd=0.05, dtype=jnp.float64)
    assert set(routes.values()) == {"muon", "adam", "adamw"}
    for name in SHAPES:
        moved = np.max(np.abs(ref[name] - params[name]))
        assert moved > 1e-3, name  # every parameter really moved
        assert out[name].dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(out[name]), ref[name], rtol=0, atol=1e-9, err_msg=name)


def test_hybrid_muon_magma_off_and_default_decay(x64):
    params, ref, out, _ = run_both("slice", True, magma=False, wd=1e-3, dtype=jnp.float64)
    for name in SHAPES:
        np.testing.assert_allclose(np.asarray(out[name]), ref[name], rtol=0, atol=1e-9, err_msg=name)
    # Magma-lite changes the Muon leaves (so the test above can tell it apart).
    _, ref_magma, _, _ = run_both("slice", True, magma=True, wd=1e-3, dtype=jnp.float64)
    assert np.max(np.abs(ref_magma["blk.square.weight"] - ref["blk.square.weight"])) > 1e-4


def test_hybrid_muon_float32_close_to_float64_model():
    params, ref, out, _ = run_both("slice", True, magma=True, wd=0.05, dtype=jnp.float32)
    for name in SHAPES:
        assert out[name].dtype == jnp.float32
        moved = np.max(np.abs(ref[name] - params[name]))
        err = np.max(np.abs(np.asarray(out[name], np.float64) - ref[name]))
        assert err < 1e-4 * moved + 1e-6, (name, err, moved)


def test_orthogonal_output_and_scale(x64):
    """One Muon step on a square matrix: the update is lr * 0.18 * sqrt(n) * damp * polar(g)."""
    rng = np.random.default_rng(3)
    g = rng.normal(size=(8, 8))
    tx = hybrid_muon(1.0, weight_decay=0.0)
    params = {"w": jnp.zeros((8, 8))}
    upd, _ = tx.update({"w": jnp.asarray(g)}, tx.init(params), params)
    # Polar factor from the SVD (independent of Newton-Schulz).
    uu, _, vt = np.linalg.svd(g)
    # First step: momentum (1-beta) g is parallel to g, cos = 1, raw = 1,
    # EMA = 0.9*0.5 + 0.1 = 0.55, damp = 0.1 + 0.9*0.55.
    expected = -(0.18 * math.sqrt(8)) * (0.1 + 0.9 * 0.55) * (uu @ vt)
    # Newton-Schulz is an approximation of the polar factor: ~1e-3 agreement.
    np.testing.assert_allclose(np.asarray(upd["w"]), expected, atol=5e-3 * np.abs(expected).max())


# ---------------------------------------------------------------------------
# jit
# ---------------------------------------------------------------------------


def test_jit_matches_eager():
    rng = np.random.default_rng(5)
    params = {
        "net": {"weight": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=(7,)), jnp.float32)},
        "so3": {"weight": jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32)},
        "adamw_attn_logit_w": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
    }
    tx = hybrid_muon(wsd_schedule(1e-2, 20, warmup_steps=2, decay_ratio=0.5, decay_type="cosine"))
    state_e = state_j = tx.init(params)
    update_j = jax.jit(tx.update)
    for step in range(3):
        grads = jax.tree_util.tree_map(
            lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        upd_e, state_e = tx.update(grads, state_e, params)
        upd_j, state_j = update_j(grads, state_j, params)
        for a, b in zip(jax.tree_util.tree_leaves((upd_e, state_e)), jax.tree_util.tree_leaves((upd_j, state_j))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
        params = optax.apply_updates(params, upd_j)
    assert int(state_j.count) == 3
    # A whole step compiles to one XLA computation (one trace, no Python state).
    assert update_j.lower(grads, state_j, params).compile() is not None


def test_zero_gradients_stay_finite():
    params = {"w": jnp.ones((3, 5)), "sq": jnp.ones((2, 4, 4)), "bias": jnp.ones(5),
              "adamw_w": jnp.ones((2, 2))}
    tx = hybrid_muon(1e-2, weight_decay=0.1)
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    upd, state = jax.jit(tx.update)(grads, tx.init(params), params)
    for leaf in jax.tree_util.tree_leaves((upd, state)):
        assert np.all(np.isfinite(np.asarray(leaf)))
    # Only the decoupled decay is left, on the Muon and AdamW routes.
    np.testing.assert_allclose(np.asarray(upd["w"]), -1e-3 * np.ones((3, 5)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(upd["adamw_w"]), -1e-3 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(upd["bias"]), np.zeros(5))


# ---------------------------------------------------------------------------
# WSD schedule
# ---------------------------------------------------------------------------

WSD_CASES = [
    # (kwargs of wsd_schedule, total_steps)
    (dict(PAPER_WSD), 100_000),
    (dict(peak_lr=4.5e-4, lr_min=1e-6, warmup_ratio=0.003, warmup_start_factor=0.2,
          decay_ratio=0.65, decay_type="cosine"), 1_000_000),  # the reference's water example
    (dict(peak_lr=1e-3, lr_min=1e-5, warmup_steps=10, decay_ratio=0.3, decay_type="inverse_linear"), 100),
    (dict(peak_lr=1e-3, lr_min=1e-5, decay_ratio=0.25, decay_type="linear"), 40),
    # int() truncation of fractional phase lengths: T_w = int(4.5), T_d = int(13.5)
    (dict(peak_lr=1e-3, lr_min=1e-5, warmup_ratio=0.1, warmup_start_factor=0.3,
          decay_ratio=0.3, decay_type="linear"), 45),
    (dict(peak_lr=1e-3, lr_min=1e-5, warmup_steps=7, decay_ratio=1.0, decay_type="cosine"), 20),
]


def probe_steps(total, kw):
    """Start, inside/end of warm-up, stable, decay start/middle, end, after end."""
    w = kw.get("warmup_steps") or int(kw.get("warmup_ratio", 0) * total)
    d = max(1, min(int(kw["decay_ratio"] * total), total - w))
    s0 = total - d
    steps = {0, 1, max(w - 1, 0), w, w + 1, (w + s0) // 2, s0 - 1, s0, s0 + 1, s0 + d // 2,
             total - 2, total - 1, total, total + 1, 3 * total}
    return sorted(x for x in steps if x >= 0)


@pytest.mark.parametrize("kw,total", WSD_CASES)
def test_wsd_matches_reference(x64, kw, total):
    from deepmd.dpmodel.utils import learning_rate as lr_mod  # the reference: a pinned test dependency
    kw = dict(kw)
    ref = lr_mod.LearningRateWSD(
        start_lr=kw["peak_lr"], stop_lr=kw["lr_min"], num_steps=total,
        warmup_steps=kw.get("warmup_steps", 0), warmup_ratio=kw.get("warmup_ratio"),
        warmup_start_factor=kw.get("warmup_start_factor", 0.0),
        decay_phase_ratio=kw["decay_ratio"], decay_type=kw["decay_type"],
    )
    sched = wsd_schedule(total_steps=total, **kw)
    jsched = jax.jit(sched)
    for t in probe_steps(total, kw):
        expected = ref.value(t)
        assert float(sched(t)) == pytest.approx(expected, rel=1e-12, abs=0), t
        assert float(jsched(jnp.asarray(t, jnp.int32))) == pytest.approx(expected, rel=1e-12, abs=0), t


def test_wsd_float32_matches_reference():
    from deepmd.dpmodel.utils import learning_rate as lr_mod  # the reference: a pinned test dependency
    total = 2_000_000
    ref = lr_mod.LearningRateWSD(start_lr=6e-4, stop_lr=1e-6, num_steps=total, warmup_steps=5000,
                                 decay_phase_ratio=0.65, decay_type="cosine")
    sched = jax.jit(wsd_schedule(total_steps=total, **PAPER_WSD))
    for t in probe_steps(total, PAPER_WSD):
        assert float(sched(jnp.asarray(t, jnp.int32))) == pytest.approx(ref.value(t), rel=2e-6), t


def test_wsd_hand_values(x64):
    # peak 1e-3, T = 1000, T_w = 100 from 0.1*peak, T_d = int(0.3*1000) = 300,
    # so the stable phase is t in [100, 700) and the cosine runs over [700, 1000).
    sched = wsd_schedule(1e-3, 1000, warmup_steps=100, warmup_start_factor=0.1,
                         decay_ratio=0.3, decay_type="cosine", lr_min=1e-5)
    hand = {
        0: 1e-4,
        50: 1e-4 + 0.9e-3 * 0.5,
        99: 1e-4 + 0.9e-3 * 0.99,
        100: 1e-3,
        400: 1e-3,
        699: 1e-3,
        700: 1e-3,  # tau = 0
        850: 1e-5 + (1e-3 - 1e-5) * 0.5,  # tau = 1/2: cos = 0
        925: 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 - math.sqrt(0.5)),  # tau = 3/4
        1000: 1e-5,
        5000: 1e-5,
    }
    for t, v in hand.items():
        assert float(sched(t)) == pytest.approx(v, rel=1e-12), t
    # Inverse-linear midpoint is the harmonic mean of the end points; linear the mean.
    inv = wsd_schedule(1e-3, 1000, decay_ratio=0.2, decay_type="inverse_linear", lr_min=1e-5)
    lin = wsd_schedule(1e-3, 1000, decay_ratio=0.2, decay_type="linear", lr_min=1e-5)
    assert float(inv(900)) == pytest.approx(2 / (1 / 1e-3 + 1 / 1e-5), rel=1e-12)
    assert float(lin(900)) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-12)
    assert float(inv(0)) == pytest.approx(1e-3, rel=1e-12)  # no warm-up: starts at peak


def test_wsd_validation():
    with pytest.raises(ValueError):
        wsd_schedule(1e-3, 100, warmup_steps=10, warmup_ratio=0.1)
    with pytest.raises(ValueError):
        wsd_schedule(1e-3, 100, warmup_steps=100)
    with pytest.raises(ValueError):
        wsd_schedule(1e-3, 100, decay_ratio=0.0)
    with pytest.raises(ValueError):
        wsd_schedule(1e-3, 100, decay_type="exp")
