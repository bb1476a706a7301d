"""python -m dpa4_jax.serve: MD driven over an i-PI UNIX socket equals MD with the calculator itself."""

import os
import threading

import ase.io
import numpy as np
import pytest
from ase import units
from ase.calculators.socketio import SocketIOCalculator
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet
from conftest import cu_au_cell
from test_evaluate import save_checkpoint

from dpa4_jax import serve

STEPS = 5


def run_md(atoms, calc):
    """Energy, forces and stress after each of ``STEPS`` velocity-Verlet steps (and before the first)."""
    atoms.calc = calc
    trajectory = []
    dyn = VelocityVerlet(atoms, timestep=2 * units.fs)
    dyn.attach(lambda: trajectory.append((atoms.get_potential_energy(), atoms.get_forces().copy(),
                                          atoms.get_stress().copy(), atoms.positions.copy())))
    dyn.run(STEPS)
    return trajectory


def test_md_through_the_socket_equals_direct_md(tiny_calc, tmp_path):
    start = cu_au_cell(seed=2).repeat((2, 1, 1))
    thermalize_momenta(start, temperature_K=600, rng=np.random.default_rng(0))
    ase.io.write(tmp_path / "start.extxyz", start)
    workdir = save_checkpoint(tiny_calc, tmp_path / "run")
    name = f"dpa4_test_{os.getpid()}"  # /tmp/ipi_<name>
    failures = []

    def driver():
        try:
            serve.main(["--model", str(workdir), "--structure", str(tmp_path / "start.extxyz"), "--unix", name,
                        "--timeout", "120"])
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            failures.append(e)

    with SocketIOCalculator(unixsocket=name, timeout=120) as server:  # listening before the driver connects
        client = threading.Thread(target=driver, daemon=True)
        client.start()
        through_socket = run_md(start.copy(), server)
    client.join(timeout=60)
    assert not client.is_alive() and not failures, failures
    direct = run_md(start.copy(), tiny_calc)

    assert len(through_socket) == len(direct) == STEPS + 1
    for (e1, f1, s1, r1), (e2, f2, s2, r2) in zip(through_socket, direct):
        assert e1 == pytest.approx(e2, abs=1e-10)
        np.testing.assert_allclose(f1, f2, atol=1e-10)
        np.testing.assert_allclose(s1, s2, atol=1e-10)
        np.testing.assert_allclose(r1, r2, atol=1e-10)
    assert np.ptp([e for e, *_ in direct]) > 1e-4  # the atoms did move: the steps are not all one calculation


def test_address_and_a_missing_server():
    assert serve.parse_address("127.0.0.1:31415") == ("127.0.0.1", 31415)
    with pytest.raises(ValueError, match="HOST:PORT"):
        serve.parse_address("31415")
    name = f"dpa4_absent_{os.getpid()}"
    with pytest.raises(ConnectionError, match=f"/tmp/ipi_{name}"):  # fails at the connection, before any model
        serve.serve(None, cu_au_cell(), unixsocket=name)
