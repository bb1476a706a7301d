"""An i-PI socket driver: LAMMPS (``fix ipi``), i-PI or ASE's ``SocketIOCalculator`` drive a dpa4-jax model.

    python -m dpa4_jax.serve --model runs/x --structure start.xyz --address localhost:31415
    python -m dpa4_jax.serve --model runs/x --structure start.xyz --unix dpa4    # UNIX socket /tmp/ipi_dpa4

The driver connects to the server (the MD code, which must be listening first) and answers each step's
positions and cell with the energy, forces and virial, until the server ends the run. The i-PI protocol sends
only positions and cell, so ``--structure`` (any file ASE reads) gives the elements, in the MD code's atom order,
and the periodicity; the virial is sent for fully periodic structures (zero otherwise).
"""

from __future__ import annotations

import argparse
import logging
import sys

import ase.io
from ase.calculators.socketio import SocketClient, actualunixsocketname
from tqdm.auto import tqdm

from dpa4_jax.calculator import DPA4Calculator
from dpa4_jax.logs import setup_logging

log = logging.getLogger(__name__)


def serve(calc, atoms, host: str = "localhost", port: int | None = None, unixsocket: str | None = None,
          timeout: float | None = None, progress: bool = False) -> int:
    """Answer an i-PI server's force requests for ``atoms`` (its elements and pbc; positions and cell come from
    the server) with ``calc``, until the server sends EXIT or closes the connection. Returns the number of steps.

    ``unixsocket``: the name of a UNIX socket (``/tmp/ipi_<name>``), else ``host:port`` over TCP.
    """
    atoms = atoms.copy()
    atoms.calc = calc
    try:
        client = SocketClient(host=host, port=port, unixsocket=unixsocket, timeout=timeout)
    except OSError as e:
        where = f"UNIX socket {actualunixsocketname(unixsocket)}" if unixsocket else f"{host}:{port}"
        raise ConnectionError(f"no i-PI server at {where} ({e.strerror or e}); start the server first") from e
    steps = 0
    # The calculator gives a stress only for fully periodic structures.
    for _ in tqdm(client.irun(atoms, use_stress=bool(atoms.pbc.all())), desc="steps", disable=not progress):
        steps += 1
    log.info("server ended the run after %d steps", steps)
    return steps


def parse_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--address {address!r}: expected HOST:PORT, e.g. localhost:31415")
    return host, int(port)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="work directory of train.py, its model/ directory, or a DeePMD-kit "
                   "DPA4 model file (.pt, .dp, .yaml)")
    p.add_argument("--structure", required=True, help="initial structure (any ASE-readable file): elements, pbc")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="HOST:PORT of the server (TCP)")
    where.add_argument("--unix", metavar="NAME", help="UNIX socket /tmp/ipi_NAME (LAMMPS: fix ipi NAME 0 unix)")
    p.add_argument("--periodic", action="store_true", help="treat the structure as periodic in x, y and z")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None, help="default: the training dtype")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the server (default: forever)")
    args = p.parse_args(argv)

    setup_logging()
    try:
        host, port = parse_address(args.address) if args.address else ("localhost", None)
    except ValueError as e:
        p.error(str(e))
    atoms = ase.io.read(args.structure)
    if args.periodic:
        atoms.pbc = True
    calc = DPA4Calculator.load(args.model, dtype=args.dtype)
    serve(calc, atoms, host, port, args.unix, args.timeout, progress=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
