"""DPA4 in JAX-MD: an energy function, a neighbour list for any box size and a chunked MD driver.

Usage, periodic (``space.periodic_general``, fractional coordinates)::

    positions, box, species = from_atoms(atoms, calc.config.type_map)
    displacement, shift = space.periodic_general(box)
    neighbor_fn = neighbor_list(box, calc.config.rcut)
    energy = energy_fn(calc, species, box)
    nbrs = neighbor_fn.allocate(positions)
    init, apply = simulate.nvt_nose_hoover(energy, shift, dt, kT)
    state = init(key, positions, mass=masses, neighbor=nbrs)
    state, nbrs = run(apply, state, neighbor_fn, nbrs, steps=1000)

``space.periodic(side)`` (Cartesian positions) takes ``box=side`` and
``fractional_coordinates=False``; free space takes ``box=None``. Units are ASE's
(eV, A, amu, ``ase.units.fs``); ``quantity.stress`` gives eV/A^3 with JAX-MD's
sign (positive under compression: minus ASE's stress).

JAX-MD's minimum-image ``partition.neighbor_list`` silently drops edges in cells
narrower than twice the cutoff. ``custom_partition.neighbor_list_multi_image``
keeps them but tries 27 or more images of every pair (a second per rebuild at
1,000 atoms here), and its shifts go stale when the integrator wraps an atom
into the cell before the list is updated. ``neighbor_list`` has two searches that
give every pair and image: in small boxes, the images around each pair's minimum
image (one in cells wider than twice the cutoff + skin), O(N^2) memory; in large
boxes a cell list, O(N) memory (20,000 atoms: 136 MB of scratch per rebuild where
the N^2 search would need 8.4 GB). ``energy_fn`` follows wrapped atoms.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import dataclasses, partition, space

from dpa4_jax import graph as graphs
from dpa4_jax.elements import species_indices

log = logging.getLogger(__name__)


def from_atoms(atoms, type_map, fractional_coordinates: bool = True):
    """JAX-MD inputs of an ASE structure: ``(positions (N, 3), box (3, 3) or None, species (N,))``.

    A periodic structure gets JAX-MD's box (lattice vectors as columns: ``atoms.cell.T``)
    and fractional positions unless ``fractional_coordinates=False``; a molecule
    (no periodic direction) gets Cartesian positions and ``box=None`` (free space).
    """
    species = jnp.asarray(species_indices(atoms.numbers, type_map, atoms.get_chemical_formula()))
    if not atoms.pbc.any():
        return jnp.asarray(atoms.positions), None, species
    if not atoms.pbc.all():
        raise ValueError(f"pbc={atoms.pbc.tolist()}: JAX-MD spaces are periodic in all directions or none")
    positions = atoms.get_scaled_positions() if fractional_coordinates else atoms.positions
    return jnp.asarray(positions), jnp.asarray(atoms.cell.array.T), species


def energy_fn(potential, species, box=None, *, fractional_coordinates: bool = True) -> Callable[..., jnp.ndarray]:
    """Total energy (eV) of a DPA4 model as a JAX-MD energy function.

    Args:
      potential: a ``DPA4Calculator`` or a ``(model, variables)`` pair.
      species: ``(N,)`` type indices into the model's type map.
      box: JAX-MD box (scalar, ``(3,)`` or ``(3, 3)`` with lattice vectors as
        columns), or None for free space.
      fractional_coordinates: positions are fractional (``space.periodic_general``'s
        default) or Cartesian (``space.periodic``; always in free space).

    Returns:
      ``energy(position (N, 3), neighbor, box=None, perturbation=None, **unused) -> ()``,
      differentiable in positions (``-grad`` gives Cartesian forces, fractional
      positions included) and box. ``neighbor`` is a list from ``neighbor_list``.
      ``box=`` overrides the box (``quantity.stress`` passes it), ``perturbation``
      is the strain ``quantity.stress`` applies to every edge vector.
    """
    model, variables = potential if isinstance(potential, tuple) else (potential.model, potential.variables)
    species = jnp.asarray(species)
    n_atoms = species.shape[0]
    rcut = model.config.rcut
    fractional_coordinates = fractional_coordinates and box is not None

    def energy(position, neighbor, box=box, perturbation=None, **unused):
        receivers, senders = neighbor.idx  # padding edges point at atom N
        valid = receivers < n_atoms
        senders, receivers = jnp.where(valid, senders, 0), jnp.where(valid, receivers, 0)
        shifts = neighbor.shifts
        if box is not None:
            # The integrator wraps atoms into the cell before the list is updated: follow those jumps.
            jumps = _lattice_jumps(position, neighbor.reference_position, box, fractional_coordinates)
            shifts = shifts + jumps[receivers] - jumps[senders]
        if fractional_coordinates:
            # space.transform's custom JVP makes gradients in fractional positions Cartesian.
            position = space.transform(box, position)
        vec = position[senders] - position[receivers]
        if box is not None:
            vec = vec + space.raw_transform(box, shifts.astype(vec.dtype))
        if perturbation is not None:
            vec = space.raw_transform(perturbation, vec)
        # The list reaches rcut + skin; the calculator's graph stops at rcut.
        mask = valid & (jnp.sum(vec * vec, axis=-1) < rcut**2)
        return jnp.sum(model.apply(variables, species, vec, senders, receivers, mask))

    return energy


def _warn_close_pairs(position, box, idx, shifts, fractional: bool, min_pair_dist: float, radius: float) -> bool:
    """Log a warning naming the pairs closer than ``min_pair_dist`` (A), from a list of pairs within ``radius``.

    ``graph.close_pairs`` does the work (the calculator's check); it searches again
    only when ``min_pair_dist`` exceeds the list's radius. Returns whether it warned.
    """
    n = position.shape[0]
    receivers, senders = np.asarray(idx)
    real = receivers < n
    positions = np.asarray(space.transform(box, position) if fractional else position)
    cell = np.zeros((3, 3)) if box is None else np.asarray(box).T
    edges = (senders[real], receivers[real], np.asarray(shifts)[real]) if min_pair_dist <= radius else None
    pairs, distances = graphs.close_pairs(positions, cell, [box is not None] * 3, min_pair_dist, edges, "jax_md")
    if len(pairs):
        log.warning("dpa4_jax.jax_md neighbour list: %s; such pairs lie outside any training data (warned once)",
                    graphs.describe_close_pairs(pairs, distances, min_pair_dist))
    return bool(len(pairs))


def _lattice_jumps(position, reference, box, fractional_coordinates: bool) -> jnp.ndarray:
    """``(N, 3)`` whole lattice vectors each atom has jumped since ``reference`` (wrapping into the cell).

    Atoms move far less than half a cell between list builds, so rounding the
    fractional displacement separates jumps from motion.
    """
    delta = position - reference
    if not fractional_coordinates:
        delta = space.raw_transform(space.inverse(box), delta)
    return jax.lax.stop_gradient(jnp.round(delta)).astype(jnp.int32)


@dataclasses.dataclass
class NeighborList:
    """Sparse multi-image neighbour list (JAX-MD's ``NeighborList`` interface).

    ``idx`` ``(2, capacity)``: receivers (centres) and senders, padded with N.
    ``shifts`` ``(capacity, 3)`` int: the sender's image, so that the edge vector is
    ``x[sender] - x[receiver] + box @ shift`` for ``reference_position``, the
    positions of the last build (``energy_fn`` follows lattice jumps since).
    """

    idx: jnp.ndarray
    shifts: jnp.ndarray
    reference_position: jnp.ndarray
    reference_box: jnp.ndarray  # (3, 3); zeros in free space
    did_buffer_overflow: jnp.ndarray
    max_occupancy: int = dataclasses.static_field()  # capacity
    # Multi-image search: images on each side of the minimum image; cell list: cells on each side of an atom's.
    images: tuple[int, int, int] = dataclasses.static_field()
    cells: tuple[int, int, int] | None = dataclasses.static_field()  # cells per axis; None: multi-image search
    cell_capacity: int = dataclasses.static_field()  # atoms per cell (cell list)
    update_fn: Callable = dataclasses.static_field()

    def update(self, position, **kwargs) -> "NeighborList":
        return self.update_fn(position, self, **kwargs)


def _box_matrix(box) -> jnp.ndarray:
    """``(3, 3)`` matrix of a scalar, ``(3,)`` or ``(3, 3)`` JAX-MD box."""
    box = jnp.asarray(box)
    return box if box.ndim == 2 else jnp.diag(jnp.broadcast_to(box, (3,)))


def _heights(box) -> jnp.ndarray:
    """``(3,)`` widths of the cell across its three pairs of faces (A)."""
    return 1.0 / jnp.linalg.norm(jnp.linalg.inv(box), axis=1)


def _image_range(box, radius) -> jnp.ndarray:
    """``(3,)`` images to search on each side of a pair's minimum image: ``floor(radius / height + 1/2)``.

    A pair vector within ``radius`` has fractional components at most ``radius / height``
    (``height``: the cell's width across the faces); the minimum image is within 1/2.
    """
    return jnp.floor(radius / _heights(box) + 0.5).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("images", "radius", "fractional", "capacity"))
def _search(position, box, *, images, radius, fractional, capacity):
    """Pairs within ``radius``: ``(idx (2, capacity), shifts (capacity, 3), count)``.

    All ``(image, receiver, sender)`` candidates, ``(S, N, N)``: O(S N^2), with
    ``S = prod(2 images + 1)``, 1 in cells wider than twice the radius.
    """
    n = position.shape[0]
    stencil = jnp.array(list(itertools.product(*(range(-k, k + 1) for k in images))), jnp.int32)  # (S, 3)
    if box is None:
        frac = position
        nearest = jnp.zeros((n, n, 3), jnp.int32)
        cartesian = lambda f: f
    else:
        frac = position if fractional else space.raw_transform(jnp.linalg.inv(box), position)
        nearest = jnp.round(frac[None, :] - frac[:, None]).astype(jnp.int32)  # (N, N, 3) [receiver, sender]
        cartesian = lambda f: space.raw_transform(box, f)
    shift = stencil[:, None, None] - nearest[None]  # (S, N, N, 3) sender image
    vec = cartesian(frac[None, None, :] - frac[None, :, None] + shift)
    self_pair = jnp.all(shift == 0, axis=-1) & jnp.eye(n, dtype=bool)
    within = (jnp.sum(vec * vec, axis=-1) < radius**2) & ~self_pair  # (S, N, N)
    flat = jnp.nonzero(within.ravel(), size=capacity, fill_value=within.size)[0]
    found = flat < within.size
    image, receiver, sender = jnp.unravel_index(jnp.where(found, flat, 0), within.shape)
    idx = jnp.where(found, jnp.stack([receiver, sender]), n).astype(jnp.int32)
    shifts = jnp.where(found[:, None], shift[image, receiver, sender], 0)
    return idx, shifts, jnp.sum(within)


def _cell_grid(box, radius) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Cells per axis, ``floor(height / radius)`` (at least 1), and the cells a pair within ``radius`` spans.

    A pair within ``radius`` differs by at most ``radius / height`` in each fractional
    coordinate, so by at most ``ceil(radius * cells / height)`` cells: 1 when a cell is
    at least ``radius`` wide, more along an axis narrower than ``radius``.
    """
    heights = _heights(box)
    cells = jnp.maximum(jnp.floor(heights / radius), 1)
    return tuple(int(c) for c in cells), tuple(int(k) for k in _cell_reach(box, radius, cells))


def _cell_reach(box, radius, cells) -> jnp.ndarray:
    """``(3,)`` cells on each side of its own that a pair within ``radius`` can reach in ``box``."""
    return jnp.ceil(radius * jnp.asarray(cells) / _heights(box)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cells", "fractional"))
def _assign_cells(position, box, *, cells, fractional):
    """Each atom's cell: ``(cell (N, 3), flat id (N,), wrapped fractional position (N, 3), lattice offset (N, 3))``.

    ``position = box @ (wrapped + offset)``; cells are ``1 / cells`` wide in fractional coordinates.
    """
    frac = position if fractional else space.raw_transform(jnp.linalg.inv(box), position)
    offset = jnp.floor(frac)
    wrapped = frac - offset
    n = jnp.array(cells)
    cell = jnp.clip(jnp.floor(wrapped * n).astype(jnp.int32), 0, n - 1)  # clip: wrapped * n can round up to n
    return cell, (cell[:, 0] * cells[1] + cell[:, 1]) * cells[2] + cell[:, 2], wrapped, offset.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cells", "reach", "radius", "fractional", "capacity", "cell_capacity"))
def _cell_search(position, box, *, cells, reach, radius, fractional, capacity, cell_capacity):
    """Pairs within ``radius`` by a cell list: ``(idx (2, capacity), shifts (capacity, 3), count, fullest cell)``.

    Atoms are sorted by cell into a ``(cells, cell_capacity)`` table; each atom's
    candidates are the atoms of the ``S = prod(2 reach + 1)`` cells around its own
    (27 in boxes at least ``radius`` wide), ``(N, S, cell_capacity)``: O(N) memory.
    Each stencil cell is one lattice image of a cell (the unwrapped cell index is
    distinct for each offset), so every ``(sender, shift)`` is tried at most once.
    """
    n = position.shape[0]
    cell, cell_id, wrapped, offset = _assign_cells(position, box, cells=cells, fractional=fractional)
    n_cells = math.prod(cells)
    order = jnp.argsort(cell_id)
    occupancy = jnp.bincount(cell_id, length=n_cells)
    first = jnp.cumsum(occupancy) - occupancy  # where each cell starts in ``order``
    slot = jnp.arange(n) - first[cell_id[order]]
    table = jnp.full((n_cells, cell_capacity), n, jnp.int32)
    table = table.at[cell_id[order], slot].set(order.astype(jnp.int32), mode="drop")  # over-full cells: dropped

    stencil = jnp.array(list(itertools.product(*(range(-k, k + 1) for k in reach))), jnp.int32)  # (S, 3)
    grid = jnp.array(cells)
    unwrapped = cell[:, None] + stencil[None]  # (N, S, 3)
    image = jnp.floor_divide(unwrapped, grid)  # lattice image of the stencil cell
    around = unwrapped - image * grid
    candidate = table[(around[..., 0] * cells[1] + around[..., 1]) * cells[2] + around[..., 2]]  # (N, S, M)
    real = candidate < n
    sender = jnp.where(real, candidate, 0)
    frac = wrapped[sender] + image[:, :, None] - wrapped[:, None, None]  # (N, S, M, 3)
    vec = space.raw_transform(box, frac)
    self_pair = (sender == jnp.arange(n)[:, None, None]) & jnp.all(image == 0, axis=-1)[..., None]
    within = real & ~self_pair & (jnp.sum(vec * vec, axis=-1) < radius**2)

    flat = jnp.nonzero(within.ravel(), size=capacity, fill_value=within.size)[0]
    found = flat < within.size
    receiver, around_index, slot = jnp.unravel_index(jnp.where(found, flat, 0), within.shape)
    senders = sender[receiver, around_index, slot]
    idx = jnp.where(found, jnp.stack([receiver, senders]), n).astype(jnp.int32)
    # Shifts refer to the positions as given, not the wrapped ones.
    shifts = image[receiver, around_index] - offset[senders] + offset[receiver]
    return idx, jnp.where(found[:, None], shifts, 0), jnp.sum(within), jnp.max(occupancy)


METHODS = ("auto", "cell_list", "multi_image")


def _plan(position, box, radius, fractional, method, capacity_multiplier) -> tuple[dict, int]:
    """The search for ``position`` in ``box`` and its candidate pairs: ``({"cells": per axis or None
    (multi-image), "images", "cell_capacity"}, candidates)``.

    ``"auto"`` takes the search with fewer candidate pairs: the cell list tries
    ``N * prod(2 reach + 1) * cell_capacity``, the multi-image search
    ``N^2 * prod(2 images + 1)``. Cells win once the box holds well over the stencil's
    27 cells (864 atoms in 5^3 cells do; 256 atoms in 3^3 cells do not: 27 cells
    with room for 1.25 times the fullest one hold more than the whole box); with 1 or
    2 cells along an axis the stencil wraps onto the same atoms at several images.
    Free space always uses the multi-image search.
    """
    n = position.shape[0]
    if box is None:
        if method == "cell_list":
            raise ValueError("neighbor_list(method='cell_list') needs a periodic box; free space (box=None) "
                             "uses the multi-image search")
        return dict(cells=None, images=(0, 0, 0), cell_capacity=0), n * n
    images = tuple(int(k) for k in _image_range(box, radius))
    image_candidates = n * n * math.prod(2 * k + 1 for k in images)
    if method == "multi_image":
        return dict(cells=None, images=images, cell_capacity=0), image_candidates
    cells, reach = _cell_grid(box, radius)
    _, cell_id, _, _ = _assign_cells(position, box, cells=cells, fractional=fractional)
    cell_capacity = math.ceil(int(jnp.max(jnp.bincount(cell_id, length=math.prod(cells)))) * capacity_multiplier)
    cell_candidates = n * math.prod(2 * k + 1 for k in reach) * cell_capacity
    if method == "cell_list" or cell_candidates < image_candidates:
        return dict(cells=cells, images=reach, cell_capacity=cell_capacity), cell_candidates
    return dict(cells=None, images=images, cell_capacity=0), image_candidates


def _find_pairs(position, box, plan, *, radius, fractional, capacity):
    """``(idx (2, capacity), shifts (capacity, 3), count, overflow)`` by the search ``plan`` (``_plan``) describes.

    ``overflow``: some pair could be missing even below ``capacity`` (a cell over its
    capacity, or a box that shrank below what the search's images or cells reach).
    """
    cells, images = plan["cells"], plan["images"]
    if cells is None:
        idx, shifts, count = _search(position, box, images=images, radius=radius, fractional=fractional,
                                     capacity=capacity)
        short = jnp.any(_image_range(box, radius) > jnp.array(images)) if box is not None else jnp.array(False)
        return idx, shifts, count, short
    idx, shifts, count, fullest = _cell_search(position, box, cells=cells, reach=images, radius=radius,
                                               fractional=fractional, capacity=capacity,
                                               cell_capacity=plan["cell_capacity"])
    short = jnp.any(_cell_reach(box, radius, cells) > jnp.array(images))
    return idx, shifts, count, short | (fullest > plan["cell_capacity"])


def neighbor_list(box, cutoff: float, *, fractional_coordinates: bool = True, dr_threshold: float = 0.25,
                  capacity_multiplier: float = 1.25, method: str = "auto",
                  min_pair_dist: float = 0.1) -> partition.NeighborListFns:
    """Neighbour list for ``energy_fn``: every pair and periodic image within ``cutoff``, any cell size.

    Two searches, chosen at each allocation (``method="auto"``) by their candidate
    count (see ``_plan``): a cell list, O(N) memory, for boxes at least ~3 cutoffs wide
    (a 20,000-atom box), and a multi-image search, O(N^2), for small boxes.

    Args:
      box: the box given to ``energy_fn`` (None: free space).
      cutoff: the model's ``rcut``.
      dr_threshold: skin (A). The list holds pairs within ``cutoff + dr_threshold``
        and is rebuilt when an atom has moved ``dr_threshold / 2`` since the last
        build (wrapping into the cell is no move) or the box changed. It must
        exceed twice the distance an atom moves in one step: integrators evaluate
        forces before they update the list. 0 rebuilds at every update.
      capacity_multiplier: edge capacity (and atoms per cell) over the count at allocation (>= 1).
      method: "auto", "cell_list" or "multi_image".
      min_pair_dist: ``allocate`` warns (once per list function) on a pair closer than this (A).
        Checked on the host at each allocation (``run`` re-allocates on overflow), never
        inside the jitted step: atoms that come closer between allocations are not reported.

    Returns:
      JAX-MD's ``(allocate, update)``: ``allocate(position, extra_capacity=0, box=None)``
      outside ``jit``; ``update(position, neighbors, box=None)`` (or
      ``neighbors.update(position)``) inside it. When ``did_buffer_overflow`` is set,
      edges were dropped (too many pairs, an over-full cell, a box that shrank too
      much): allocate again (``run`` does).
    """
    if capacity_multiplier < 1.0:
        raise ValueError(f"capacity_multiplier must be >= 1, got {capacity_multiplier}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    periodic = box is not None
    default_box = _box_matrix(box) if periodic else None
    radius = float(cutoff + dr_threshold)
    fractional = fractional_coordinates and periodic
    warned_close_pairs = False

    def cartesian(position, box):
        return space.raw_transform(box, position) if fractional else position

    def allocate(position, extra_capacity: int = 0, **kwargs) -> NeighborList:
        position = jnp.asarray(position)
        b = _box_matrix(kwargs.get("box", default_box)) if periodic else None
        plan, candidates = _plan(position, b, radius, fractional, method, capacity_multiplier)
        # One search with room for every candidate (the size of its candidate arrays), then cut to capacity:
        # the pairs come first.
        idx, shifts, count, _ = _find_pairs(position, b, plan, radius=radius, fractional=fractional,
                                            capacity=candidates)
        capacity = max(math.ceil(int(count) * capacity_multiplier) + extra_capacity * len(position), 1)
        room = max(capacity - candidates, 0)
        idx = jnp.pad(idx[:, :capacity], ((0, 0), (0, room)), constant_values=len(position))
        shifts = jnp.pad(shifts[:capacity], ((0, room), (0, 0)))
        nonlocal warned_close_pairs
        if not warned_close_pairs and min_pair_dist > 0:
            warned_close_pairs = _warn_close_pairs(position, b, idx, shifts, fractional, min_pair_dist, radius)
        return NeighborList(idx, shifts, position, jnp.zeros((3, 3), position.dtype) if b is None else b,
                            jnp.array(False), capacity, plan["images"], plan["cells"], plan["cell_capacity"],
                            update)

    def update(position, neighbors: NeighborList, **kwargs) -> NeighborList:
        b = _box_matrix(kwargs.get("box", neighbors.reference_box)) if periodic else None
        unjumped = position
        if periodic:
            jumps = _lattice_jumps(position, neighbors.reference_position, b, fractional)
            unjumped = position - (jumps if fractional else space.raw_transform(b, jumps))
        moved = jnp.max(jnp.linalg.norm(
            cartesian(unjumped, b) - cartesian(neighbors.reference_position, neighbors.reference_box), axis=-1))
        stale = 2.0 * moved >= dr_threshold
        if periodic:
            stale |= jnp.any(b != neighbors.reference_box)

        def rebuild(position):
            plan = dict(cells=neighbors.cells, images=neighbors.images, cell_capacity=neighbors.cell_capacity)
            idx, shifts, count, short = _find_pairs(position, b, plan, radius=radius, fractional=fractional,
                                                    capacity=neighbors.max_occupancy)
            return dataclasses.replace(neighbors, idx=idx, shifts=shifts, reference_position=position,
                                       reference_box=neighbors.reference_box if b is None else b,
                                       did_buffer_overflow=(count > neighbors.max_occupancy) | short)

        return jax.lax.cond(stale, rebuild, lambda _: neighbors, position)

    return partition.NeighborListFns(allocate, update)


@functools.partial(jax.jit, static_argnames=("apply_fn", "steps"))
def _scan(apply_fn, steps, state, neighbors, kwargs):
    """``steps`` steps under ``lax.scan``; the overflow flag is sticky over the chunk."""

    def step(carry, _):
        state, nbrs, overflow = carry
        state = apply_fn(state, neighbor=nbrs, **kwargs)
        nbrs = nbrs.update(state.position)
        return (state, nbrs, overflow | nbrs.did_buffer_overflow), None

    (state, neighbors, overflow), _ = jax.lax.scan(
        step, (state, neighbors, jnp.asarray(neighbors.did_buffer_overflow)), length=steps)
    return state, neighbors, overflow


def run(apply_fn, state, neighbor_fn, neighbors, steps: int, *, chunk: int = 100, **kwargs):
    """Advance a JAX-MD integrator or minimiser ``steps`` steps, ``chunk`` at a time in one jitted ``lax.scan``.

    A list that arrives overflowed is re-allocated first. After each chunk the
    overflow flag is checked: a chunk that overflowed ran with dropped edges, so it
    is discarded, a list sized for the positions at both of its ends is allocated
    and the chunk is redone. For fixed-box ensembles (NVE, NVT, FIRE); ``kwargs``
    go to ``apply_fn`` (e.g. ``kT=``). Returns ``(state, neighbors)``.
    """
    if neighbors.did_buffer_overflow:
        neighbors = neighbor_fn.allocate(state.position)
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        new_state, new_neighbors, overflow = _scan(apply_fn, n, state, neighbors, kwargs)
        if not overflow:
            state, neighbors, done = new_state, new_neighbors, done + n
            continue
        sized = max((neighbor_fn.allocate(p) for p in (state.position, new_state.position)),
                    key=lambda nbrs: nbrs.max_occupancy)
        log.info("neighbour list overflow at capacity %d: re-allocated to %d, redoing %d steps",
                 neighbors.max_occupancy, sized.max_occupancy, n)
        neighbors = neighbor_fn.update(state.position, sized)
    return state, neighbors
