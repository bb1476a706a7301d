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

``space.periodic(side)`` (Cartesian positions) takes ``fractional_coordinates=False``
and ``box=side``; free space takes ``box=None``. Units are ASE's (eV, A, amu,
``ase.units.fs``); ``quantity.stress`` gives eV/A^3 with JAX-MD's sign (positive
under compression: minus ASE's stress).

JAX-MD's minimum-image ``partition.neighbor_list`` silently drops edges in cells
smaller than twice the cutoff. This list keeps every periodic image within the
cutoff, at any cell size; it builds on ``custom_partition.neighbor_list_multi_image``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax_md import custom_partition, dataclasses, partition, space

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
    box = jnp.asarray(atoms.cell.array.T)
    positions = atoms.get_scaled_positions() if fractional_coordinates else atoms.positions
    return jnp.asarray(positions), box, species


def energy_fn(potential, species, box=None, *, fractional_coordinates: bool = True) -> Callable[..., jnp.ndarray]:
    """Total energy (eV) of a DPA4 model as a JAX-MD energy function.

    Args:
      potential: a ``DPA4Calculator`` or a ``(model, variables)`` pair.
      species: ``(N,)`` type indices into the model's type map.
      box: JAX-MD box (scalar, ``(3,)`` or ``(3, 3)`` with lattice vectors as
        columns), or None for free space.
      fractional_coordinates: positions are fractional (``space.periodic_general``'s
        default) or Cartesian (``space.periodic``, free space).

    Returns:
      ``energy(position (N, 3), neighbor, box=None, perturbation=None, **unused) -> ()``,
      differentiable in positions (``-grad`` gives Cartesian forces, fractional
      positions included) and box; ``neighbor`` comes from ``neighbor_list``.
      ``box=`` overrides the box (NPT, ``quantity.stress``), ``perturbation`` is the
      strain ``quantity.stress`` applies to every edge vector.
    """
    model, variables = potential if isinstance(potential, tuple) else (potential.model, potential.variables)
    species = jnp.asarray(species)
    n_atoms = species.shape[0]
    rcut = model.config.rcut
    if box is None and fractional_coordinates:
        fractional_coordinates = False  # free space: positions are Cartesian

    def energy(position, neighbor, box=box, perturbation=None, **unused):
        receivers, senders = neighbor.idx  # JAX-MD's order; padding edges point at atom N
        valid = receivers < n_atoms
        senders, receivers = jnp.where(valid, senders, 0), jnp.where(valid, receivers, 0)
        shifts = neighbor.shifts
        if box is not None:
            # The integrator wraps atoms into the cell before the list is updated: count those jumps.
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
    """``(N, 3)`` whole lattice vectors each atom has jumped since ``reference`` (periodic wrapping).

    Atoms move far less than half a cell between neighbour-list builds, so
    rounding the fractional displacement separates jumps from motion.
    """
    delta = position - reference
    if not fractional_coordinates:
        delta = space.raw_transform(space.inverse(box), delta)
    return jax.lax.stop_gradient(jnp.round(delta)).astype(jnp.int32)


def _box_matrix(box) -> jnp.ndarray:
    """``(3, 3)`` box of a scalar, ``(3,)`` or ``(3, 3)`` JAX-MD box."""
    box = jnp.asarray(box)
    return box if box.ndim == 2 else jnp.diag(jnp.broadcast_to(box, (3,)))


def neighbor_list(box, cutoff: float, *, fractional_coordinates: bool = True, dr_threshold: float = 0.25,
                  capacity_multiplier: float = 1.25) -> custom_partition.NeighborListMultiImageFns:
    """Multi-image neighbour list for ``energy_fn``: every image within ``cutoff``, any cell size.

    Args:
      box: the box given to ``energy_fn`` (None: free space).
      cutoff: the model's ``rcut``.
      dr_threshold: skin (A). The list holds pairs within ``cutoff + dr_threshold``
        and is rebuilt when an atom has moved ``dr_threshold / 2`` since the last
        build (wrapping into the cell is no move: the list and ``energy_fn`` follow
        those jumps). It must exceed twice the distance an atom moves in one step:
        the integrator evaluates forces before it updates the list. 0 rebuilds at
        every update.
      capacity_multiplier: edge capacity over the count at allocation.

    Returns:
      JAX-MD's ``(allocate, update)`` pair. ``allocate(position, extra_capacity=0, box=None)``
      runs outside ``jit``; ``update(position, neighbors, box=None)`` (or
      ``neighbors.update(position)``) inside it. A list is Sparse: ``idx = (receivers,
      senders)``, each ``(capacity,)`` padded with N, and integer image ``shifts``
      ``(capacity, 3)`` such that ``x[sender] - x[receiver] + box @ shift`` is the edge
      vector for the positions it was built from (``reference_position``). When ``did_buffer_overflow``
      is set, edges were dropped: allocate again (``run`` does).
    """
    periodic = box is not None
    default_box = _box_matrix(box) if periodic else None
    inner: list = []  # JAX-MD's list, made at the first allocation (free space sizes it from the atoms)

    def cartesian(position, box):
        return space.raw_transform(box, position) if periodic and fractional_coordinates else position

    def wrap(position, box):
        """Positions moved into the cell (the image search assumes it), and the integer images ``(N, 3)`` removed."""
        if not periodic:
            return position, jnp.zeros_like(position)
        frac = position if fractional_coordinates else space.raw_transform(space.inverse(box), position)
        image = jnp.floor(frac)
        return position - (image if fractional_coordinates else space.raw_transform(box, image)), image

    def own(built, position, image):
        """Re-express the image shifts for the caller's positions and take over updates."""
        receivers, senders = built.idx
        image = jnp.concatenate([image, jnp.zeros((1, 3), image.dtype)]).astype(built.shifts.dtype)  # row N: padding
        shifts = built.shifts + image[receivers] - image[senders]
        return dataclasses.replace(built, shifts=shifts, reference_position=position, update_fn=update)

    def allocate(position, extra_capacity: int = 0, **kwargs):
        position = jnp.asarray(position)
        b = _box_matrix(kwargs.get("box", default_box)) if periodic else None
        if not inner:
            if periodic:
                size_box = default_box
            else:  # only sizes the first capacity probe
                extent = jnp.max(position, axis=0) - jnp.min(position, axis=0)
                size_box = jnp.diag(jnp.maximum(extent, 1.0) + cutoff)
            inner.append(custom_partition.neighbor_list_multi_image(
                None, size_box, cutoff + dr_threshold, dr_threshold=0.0, capacity_multiplier=capacity_multiplier,
                pbc=jnp.full(3, periodic), fractional_coordinates=periodic and fractional_coordinates,
                format=partition.Sparse))
        wrapped, image = wrap(position, b)
        built = inner[0].allocate(wrapped, extra_capacity, **({"box": b} if periodic else {}))
        return own(built, position, image)

    def update(position, neighbors, **kwargs):
        b = _box_matrix(kwargs.get("box", neighbors.box)) if periodic else neighbors.box
        unwrapped = position
        if periodic:
            jumps = _lattice_jumps(position, neighbors.reference_position, b, fractional_coordinates)
            unwrapped = position - (jumps if fractional_coordinates else space.raw_transform(b, jumps))
        moved = jnp.max(jnp.linalg.norm(
            cartesian(unwrapped, b) - cartesian(neighbors.reference_position, neighbors.reference_box), axis=-1))
        # A deformed box moves the far images most (as in JAX-MD's own test).
        strained = jnp.max(jnp.linalg.norm(neighbors.search_shifts @ (b - neighbors.reference_box).T, axis=-1))

        def rebuild(position):
            wrapped, image = wrap(position, b)
            # JAX-MD's update (dr_threshold 0) rebuilds at the same capacity and flags overflow,
            # also when the box shrank below what the image stencil covers.
            built = inner[0].update(wrapped, dataclasses.replace(neighbors, update_fn=inner[0].update), box=b)
            return own(built, position, image)

        return jax.lax.cond(2.0 * moved + strained >= dr_threshold, rebuild,
                            lambda _: dataclasses.replace(neighbors, box=b), position)

    return custom_partition.NeighborListMultiImageFns(allocate, update)


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

    After each chunk the overflow flag is checked; a chunk that overflowed ran
    with dropped edges, so it is discarded: a new list, sized for the positions at
    both ends of the chunk, is allocated and the chunk redone. For fixed-box
    ensembles (NVE, NVT, FIRE). ``kwargs`` go to ``apply_fn`` (e.g. ``kT=``).
    Returns ``(state, neighbors)``.
    """
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        new_state, new_neighbors, overflow = _scan(apply_fn, n, state, neighbors, kwargs)
        if not bool(overflow):
            state, neighbors, done = new_state, new_neighbors, done + n
            continue
        sized = max((neighbor_fn.allocate(p) for p in (state.position, new_state.position)),
                    key=lambda nbrs: nbrs.max_occupancy)
        log.info("neighbour list overflow at capacity %d: re-allocated to %d, redoing %d steps",
                 neighbors.max_occupancy, sized.max_occupancy, n)
        neighbors = neighbor_fn.update(state.position, sized)
    return state, neighbors
