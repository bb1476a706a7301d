"""Data parallelism: the checks of ``data_parallel_checks.py`` in a process with four emulated CPU devices.

XLA fixes the number of CPU devices when JAX starts, so they run in a process of their own; the rest of the
suite keeps the single device that users have.
"""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_data_parallel_on_four_emulated_devices():
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(HERE / "data_parallel_checks.py")], env=env, cwd=HERE.parent,
                         capture_output=True, text=True, timeout=3000)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "4 passed" in run.stdout, run.stdout[-2000:]
