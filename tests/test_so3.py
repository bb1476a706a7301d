"""SO(3) machinery: harmonics basis, Wigner-D rows, Lebedev orthogonality, grid equivariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from deepmd.dpmodel.descriptor.dpa4_nn import wignerd  # the reference, a pinned test dependency
from scipy.spatial.transform import Rotation

from dpa4_jax.nn.ffn import GridFFN
from dpa4_jax.nn.grid import GridSpec, MessageNodeGrid
from dpa4_jax.so3 import LebedevGrid, spherical_harmonics
from dpa4_jax.so3.grid import so3_projection
from dpa4_jax.so3.layout import MMajorLayout
from dpa4_jax.so3.wigner import EdgeFrame, edge_frames, edge_quaternion, quaternion_to_matrix, rotate_in, rotate_out

LMAX = 6


def full_wigner(rotations, lmax):
    """``(E, (L+1)^2, (L+1)^2)`` block-diagonal real Wigner-D from the untruncated rows."""
    blocks = jax.jit(edge_frames, static_argnums=(1, 2))(jnp.asarray(rotations), lmax, lmax).blocks
    dim = (lmax + 1) ** 2
    d = np.zeros((len(rotations), dim, dim))
    for l, b in enumerate(blocks):
        d[:, l * l:(l + 1) ** 2, l * l:(l + 1) ** 2] = b
    return d


sh = jax.jit(spherical_harmonics, static_argnums=1)


def unit_vectors(n, seed):
    v = np.random.default_rng(seed).normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_l1_is_y_z_minus_x():
    u = unit_vectors(5, 0)
    y = np.asarray(spherical_harmonics(jnp.asarray(u), 1))
    np.testing.assert_allclose(y[:, 1:], np.stack([u[:, 1], u[:, 2], -u[:, 0]], 1), atol=1e-15)
    np.testing.assert_allclose(np.sum(y[:, 1:] ** 2, axis=1), 1.0)  # "norm" normalisation


def test_wigner_rotates_harmonics():
    """D(R) Y(v) = Y(R v) for every degree up to 6, and D is orthogonal."""
    rot = Rotation.random(8, random_state=1).as_matrix()
    v = unit_vectors(8, 2)
    d = full_wigner(rot, LMAX)
    lhs = np.einsum("eij,ej->ei", d, np.asarray(sh(jnp.asarray(v), LMAX)))
    rhs = np.asarray(sh(jnp.asarray(np.einsum("eij,ej->ei", rot, v)), LMAX))
    np.testing.assert_allclose(lhs, rhs, atol=1e-13)
    np.testing.assert_allclose(np.einsum("eij,ekj->eik", d, d), np.broadcast_to(np.eye(d.shape[1]), d.shape), atol=1e-13)


def test_edge_frame_maps_bond_to_z():
    """The blended two-chart frame sends every direction, poles included, to +z."""
    v = np.concatenate([unit_vectors(50, 3), [[0, 0, 1], [0, 0, -1], [1e-9, 0, -1], [0, 1e-9, 1]]])
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    r = quaternion_to_matrix(edge_quaternion(jnp.asarray(v), jnp.ones((len(v), 1)), 1e-7))
    np.testing.assert_allclose(np.einsum("eij,ej->ei", r, v), np.tile([0.0, 0.0, 1.0], (len(v), 1)), atol=1e-12)


def to_local(x: jnp.ndarray, frame: EdgeFrame, lmax: int, mmax: int) -> list[jnp.ndarray]:
    """Rotate packed edge features ``(E, (L+1)^2, C)`` into the edge frames, keeping ``|m| <= mmax``.

    Returns one array per m of the m-major layout (``MMajorLayout``), ``(E, n_degrees, C)`` for
    m = 0, -1, +1, -2, +2, ...: ``rotate_in`` with its pairs split.
    """
    groups = rotate_in([x[:, l * l:(l + 1) ** 2] for l in range(lmax + 1)], frame, lmax, mmax)
    return groups[:1] + [pair[:, :, side] for pair in groups[1:] for side in (0, 1)]


def to_global(blocks: list[jnp.ndarray], frame: EdgeFrame, lmax: int, mmax: int) -> jnp.ndarray:
    """Rotate local blocks (as returned by ``to_local``) back to the packed layout ``(E, (L+1)^2, C)``."""
    groups = blocks[:1] + [jnp.stack(blocks[i:i + 2], axis=2) for i in range(1, len(blocks), 2)]
    return jnp.concatenate(rotate_out(groups, frame, lmax, mmax), axis=1)


def test_local_frame_round_trip():
    """rotate_in keeps exactly the |m| <= mmax rows (in the m-major layout); rotate_out is its transpose."""
    lmax, mmax = 4, 2
    rot = Rotation.random(6, random_state=4).as_matrix()
    frame = jax.jit(edge_frames, static_argnums=(1, 2))(jnp.asarray(rot), lmax, mmax)
    x = np.random.default_rng(5).normal(size=(6, (lmax + 1) ** 2, 3))
    blocks = to_local(jnp.asarray(x), frame, lmax, mmax)
    local = np.concatenate(blocks, axis=1)  # the blocks, concatenated, are the m-major layout
    expected = np.einsum("erc,ecf->erf", full_wigner(rot, lmax)[:, MMajorLayout(lmax, mmax).packed], x)
    np.testing.assert_allclose(local, expected, atol=1e-13)
    back = np.asarray(to_global(blocks, frame, lmax, mmax))
    np.testing.assert_allclose(np.einsum("erf,erf", local, local), np.einsum("ecf,ecf", back, x), rtol=1e-12)


@pytest.mark.parametrize("lmax", range(1, LMAX + 1))
def test_lebedev_discrete_orthogonality(lmax):
    """Eq. 32: sum_k w_k Y_lm(v_k) Y_l'm'(v_k) = delta / (2l+1) on a grid exact to degree 2L."""
    grid = LebedevGrid.exact_for(2 * lmax)
    y = np.asarray(sh(jnp.asarray(grid.points), lmax))
    gram = np.einsum("k,ki,kj->ij", grid.weights, y, y)
    degree = np.repeat(np.arange(lmax + 1), 2 * np.arange(lmax + 1) + 1)
    np.testing.assert_allclose(gram, np.diag(1.0 / (2 * degree + 1)), atol=1e-13)
    to_grid, from_grid = LebedevGrid.for_product(lmax).projections(lmax)
    np.testing.assert_allclose(from_grid @ to_grid, np.eye(len(degree)), atol=1e-13)


@pytest.mark.parametrize("lmax", [2, 3, 5, 6])
def test_grid_ffn_is_equivariant(lmax):
    """The FFN with its Lebedev-grid non-linearity commutes with rotations (paper Table 3)."""
    ffn = GridFFN(lmax, hidden=8, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(lmax), (4, (lmax + 1) ** 2, 6), jnp.float64)
    params = jax.jit(ffn.init)(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
    d = jnp.asarray(full_wigner(Rotation.random(4, random_state=lmax).as_matrix(), lmax))
    apply = jax.jit(ffn.apply)
    rotated_first = apply(params, jnp.einsum("nij,njc->nic", d, x))
    rotated_after = jnp.einsum("nij,njc->nic", d, apply(params, x))
    scale = float(jnp.abs(rotated_after).max())
    assert float(jnp.abs(rotated_first - rotated_after).max()) < 1e-12 * scale


@pytest.mark.parametrize("lmax, kmax", [(2, 2)])
def test_so3_grid_is_exact(lmax, kmax):
    """The SO(3) grid (Lebedev points x rolls) inverts its own evaluation, and integrates the product of two
    band-limited fields exactly: the product's projection does not depend on the grid's orientation."""
    p = so3_projection(lmax, kmax)
    g, d, k = p.to_grid.shape
    valid = np.abs(p.to_grid).sum(0).reshape(-1) > 0  # frames |k| <= l
    assert valid.sum() == sum((2 * l + 1) * (2 * min(l, kmax) + 1) for l in range(lmax + 1))
    roundtrip = p.from_grid.reshape(d * k, g) @ p.to_grid.reshape(g, d * k)
    np.testing.assert_allclose(roundtrip[np.ix_(valid, valid)], np.eye(valid.sum()), atol=1e-12)
    # Rotating the fields (D(Q) on m) moves them on the group (f(R) -> f(R Q)): with exact quadrature the
    # projected product rotates with them.
    a, b = jax.random.normal(jax.random.key(kmax), (2, 3, d, k, 4), jnp.float64) * valid.reshape(d, k, 1)
    q = jnp.asarray(full_wigner(Rotation.random(3, random_state=lmax).as_matrix(), lmax))
    rotate = lambda x: jnp.einsum("nij,njkc->nikc", q, x)
    np.testing.assert_allclose(p.product(rotate(a), rotate(b)), rotate(p.product(a, b)), atol=1e-11)


@pytest.mark.parametrize("spec", [GridSpec(so3=True, kmax=1, op="branch", branches=2)], ids=str)
def test_grid_ffn_and_message_node_grid_are_equivariant(spec):
    """The grid nets of the reference's options commute with rotations, as FFN (self mode) and as message-node
    product (cross mode, two focus streams); the other operations are checked against the reference."""
    lmax, n_node, width = 2, 4, 6
    d = jnp.asarray(full_wigner(Rotation.random(n_node, random_state=3).as_matrix(), lmax))
    rotate = lambda x: jnp.einsum("nij,njc->nic", d, x)
    x, y = jax.random.normal(jax.random.key(2), (2, n_node, (lmax + 1) ** 2, width), jnp.float64)
    modules = [(GridFFN(lmax, hidden=4, grid=spec, param_dtype=jnp.float64), (x,))]
    if spec.so3:
        modules.append((MessageNodeGrid(lmax, 2, spec, param_dtype=jnp.float64), (x, y)))
    for module, args in modules:
        params = jax.jit(module.init)(jax.random.key(0), *args)
        params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
        apply = jax.jit(module.apply)
        after = rotate(apply(params, *args))
        np.testing.assert_allclose(apply(params, *map(rotate, args)), after, atol=1e-12 * float(jnp.abs(after).max()))


def test_basis_matches_reference_wigner():
    """Our harmonics are the zonal columns of DeePMD-kit's Wigner-D (its basis), up to l = 6."""
    u = unit_vectors(20, 6)
    q = wignerd.build_edge_quaternion(u, eps=1e-7)
    _, dt = wignerd.WignerDCalculator(LMAX, precision="float64")(q)
    y = np.asarray(sh(jnp.asarray(u), LMAX))
    for l in range(LMAX + 1):
        np.testing.assert_allclose(dt[:, l * l:(l + 1) ** 2, l * l + l], y[:, l * l:(l + 1) ** 2], atol=1e-12)
    # ... and our frames reproduce its truncated rotation rows.
    ours = jax.jit(edge_frames, static_argnums=(1, 2))(quaternion_to_matrix(jnp.asarray(q)), LMAX, 1).blocks
    d = np.swapaxes(dt, 1, 2)
    for l, block in enumerate(ours):
        k = min(l, 1)
        rows = [l * l + l + m for m in range(-k, k + 1)]
        np.testing.assert_allclose(block, d[:, rows, l * l:(l + 1) ** 2], atol=1e-12)
