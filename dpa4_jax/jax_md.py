"""DPA4 in JAX-MD: an energy function, a multi-image neighbour list and a chunked MD driver.

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
into the cell before the list is updated. ``neighbor_list`` tries the images
around each pair's minimum image (one in cells wider than twice the cutoff + skin)
and ``energy_fn`` follows wrapped atoms.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax_md import dataclasses, partition, space

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
    images: tuple[int, int, int] = dataclasses.static_field()  # searched on each side of the minimum image
    update_fn: Callable = dataclasses.static_field()

    def update(self, position, **kwargs) -> "NeighborList":
        return self.update_fn(position, self, **kwargs)


def _box_matrix(box) -> jnp.ndarray:
    """``(3, 3)`` matrix of a scalar, ``(3,)`` or ``(3, 3)`` JAX-MD box."""
    box = jnp.asarray(box)
    return box if box.ndim == 2 else jnp.diag(jnp.broadcast_to(box, (3,)))


def _image_range(box, radius) -> jnp.ndarray:
    """``(3,)`` images to search on each side of a pair's minimum image: ``floor(radius / height + 1/2)``.

    A pair vector within ``radius`` has fractional components at most ``radius / height``
    (``height``: the cell's width across the faces); the minimum image is within 1/2.
    """
    heights = 1.0 / jnp.linalg.norm(jnp.linalg.inv(box), axis=1)
    return jnp.floor(radius / heights + 0.5).astype(jnp.int32)


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


def neighbor_list(box, cutoff: float, *, fractional_coordinates: bool = True, dr_threshold: float = 0.25,
                  capacity_multiplier: float = 1.25) -> partition.NeighborListFns:
    """Multi-image neighbour list for ``energy_fn``: every image within ``cutoff``, any cell size.

    Args:
      box: the box given to ``energy_fn`` (None: free space).
      cutoff: the model's ``rcut``.
      dr_threshold: skin (A). The list holds pairs within ``cutoff + dr_threshold``
        and is rebuilt when an atom has moved ``dr_threshold / 2`` since the last
        build (wrapping into the cell is no move) or the box changed. It must
        exceed twice the distance an atom moves in one step: integrators evaluate
        forces before they update the list. 0 rebuilds at every update.
      capacity_multiplier: edge capacity over the count at allocation (>= 1).

    Returns:
      JAX-MD's ``(allocate, update)``: ``allocate(position, extra_capacity=0, box=None)``
      outside ``jit``; ``update(position, neighbors, box=None)`` (or
      ``neighbors.update(position)``) inside it. When ``did_buffer_overflow`` is set,
      edges were dropped: allocate again (``run`` does).
    """
    if capacity_multiplier < 1.0:
        raise ValueError(f"capacity_multiplier must be >= 1, got {capacity_multiplier}")
    periodic = box is not None
    default_box = _box_matrix(box) if periodic else None
    radius = float(cutoff + dr_threshold)
    fractional = fractional_coordinates and periodic

    def cartesian(position, box):
        return space.raw_transform(box, position) if fractional else position

    def allocate(position, extra_capacity: int = 0, **kwargs) -> NeighborList:
        position = jnp.asarray(position)
        b = _box_matrix(kwargs.get("box", default_box)) if periodic else None
        images = tuple(int(k) for k in _image_range(b, radius)) if periodic else (0, 0, 0)
        search = functools.partial(_search, images=images, radius=radius, fractional=fractional)
        count = int(search(position, b, capacity=0)[2])
        capacity = max(math.ceil(count * capacity_multiplier) + extra_capacity * len(position), 1)
        idx, shifts, _ = search(position, b, capacity=capacity)
        return NeighborList(idx, shifts, position, jnp.zeros((3, 3), position.dtype) if b is None else b,
                            jnp.array(False), capacity, images, update)

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
            idx, shifts, count = _search(position, b, images=neighbors.images, radius=radius,
                                         fractional=fractional, capacity=neighbors.max_occupancy)
            # A shrunk box can need more images than the list was allocated with.
            short = jnp.any(_image_range(b, radius) > jnp.array(neighbors.images)) if periodic else False
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
