"""What the benchmark scripts share: the machine, thread pinning, timing against the same run's matmul
peak, XLA's cost analysis, JSON, tables and plots, and benchmark sides that run in processes of their own.

No benchmark script imports another: shared code lives here and in ``workloads.py`` (what is measured).
Functions that import jax do so when called, so that ``set_threads`` can run first.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PEAK_SIZE = 2048  # the matmul peak: a PEAK_SIZE^2 float32 jnp.matmul
if not os.environ.get("PYTHONPATH"):  # this checkout's dpa4_jax, unless PYTHONPATH names one (common.Side does)
    sys.path.insert(1, str(ROOT))


# ------------------------------------------------------------------------------------------ machine, threads


def machine() -> dict:
    """CPU model, its vector extensions that matter for matrix products, core counts, OS and Python."""
    cpu, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    vector = sorted(x for x in flags if x in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"))
    return {"cpu": cpu, "cpu_vector_flags": vector, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "python": platform.python_version()}


def set_threads(n: int, cpus: list[int] | None = None) -> dict:
    """Thread settings for XLA and PyTorch; must run before jax, torch or deepmd are imported.

    The process is pinned to ``n`` cores (``cpus``, default the first usable ones): XLA's CPU
    client sizes its worker pool from the CPU affinity (with ``--xla_cpu_multi_thread_eigen=false``
    alone it still kept two worker threads busy on a 2-core machine). PyTorch (DeePMD-kit) reads
    ``OMP_NUM_THREADS`` and ``DP_*_PARALLELISM_THREADS`` at import.
    """
    usable = sorted(os.sched_getaffinity(0))
    cpus = cpus or usable[:n]
    if set(cpus) != set(usable):
        os.sched_setaffinity(0, cpus)
    if n == 1:  # XLA has no thread-count flag: its pool follows the affinity; this keeps each op serial
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    os.environ["JAX_PLATFORMS"] = os.environ.get("JAX_PLATFORMS", "cpu")
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["DP_INTRA_OP_PARALLELISM_THREADS"] = str(n)
    os.environ["DP_INTER_OP_PARALLELISM_THREADS"] = "1"
    return {"threads": n, "cpu_affinity": sorted(os.sched_getaffinity(0)), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


def versions() -> dict:
    import flax
    import jax
    import jaxlib
    import numpy as np
    import optax

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__}


def header(host: dict | None = None, **extra) -> dict:
    """The start of every result file: date, machine, jax devices, versions, load average, then ``extra``."""
    import jax

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": host or machine(), "jax_devices": [str(d) for d in jax.devices()], "versions": versions(),
            "load_average_start": os.getloadavg(), **extra}


# ------------------------------------------------------------------------------------------ timing, peak, floor


def timed(fn, repeats: int) -> dict:
    """Median and min wall seconds of ``fn()`` (results awaited) after one warm-up call, and the median
    process CPU seconds (on one pinned core, time the process ran: less sensitive to a shared machine's load)."""
    import jax

    jax.block_until_ready(fn())
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return {"median_s": statistics.median(walls), "min_s": min(walls), "runs_s": walls,
            "cpu_median_s": statistics.median(cpus)}


def matmul_peak(dtype, repeats: int, precision=None, size: int = PEAK_SIZE) -> dict:
    """GFLOP/s of a ``size`` square matmul in ``dtype`` (``precision``: a ``jax.lax.Precision``)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))
    t = timed(lambda: f(a, b), max(repeats, 5))
    flops = 2 * size**3
    return {"dtype": jnp.dtype(dtype).name, "precision": str(precision) if precision else "default",
            "size": size, **t, "gflops": flops / t["median_s"] / 1e9, "gflops_cpu": flops / t["cpu_median_s"] / 1e9}


def best_peak(peaks: list[dict]) -> dict:
    """The larger of peaks measured before and after the model (the machine's load changes during a run)."""
    return max(peaks, key=lambda p: p["gflops"])


def matmul_floor(row: dict, peak: dict) -> None:
    """Adds to a timed row the time its matrix products alone take at the measured peak (``matmul_floor_s``:
    no implementation of the same algorithm runs faster on this machine), that floor over the time taken,
    and the time above the floor (``above_floor_s``); by process CPU time too when the row has it (the floor
    at the peak per CPU second, ``matmul_floor_cpu_s``: on a loaded machine the pair to compare)."""
    row["matmul_floor_s"] = row["matmul_flops"] / (peak["gflops"] * 1e9)
    row["floor_over_time"] = row["matmul_floor_s"] / row["median_s"]
    row["above_floor_s"] = row["median_s"] - row["matmul_floor_s"]
    if "cpu_median_s" in row:
        row["matmul_floor_cpu_s"] = row["matmul_flops"] / (peak["gflops_cpu"] * 1e9)
        row["above_floor_cpu_s"] = row["cpu_median_s"] - row["matmul_floor_cpu_s"]


# ------------------------------------------------------------------------------------------ XLA's costs

DTYPE_BYTES = {"f64": 8, "s64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}
INSTRUCTION = re.compile(r"(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)")


def hlo_computations(text: str) -> tuple[dict, str]:
    """``{computation: [instruction lines]}`` of optimized HLO text, and the entry computation's name."""
    comps, current, entry = {}, None, None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = head.group(2)
            comps[current] = []
            entry = current if head.group(1) else entry
        elif current and line.startswith("  "):
            comps[current].append(line.strip())
    return comps, entry


def nbytes(shapes: str) -> int:
    """Bytes of the arrays named in an HLO shape string (``f32[9280,64]``, tuples summed)."""
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shapes):
        n = DTYPE_BYTES.get(dtype, 0)
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n
    return total


def dims(shape: str) -> list[int]:
    return [int(d) for d in filter(None, re.match(r"\w+\[([\d,]*)\]", shape).group(1).split(","))]


def dot_flops(dot: re.Match, shapes: dict) -> float:
    """``2 x (output elements) x (contracted size)`` of a ``dot`` instruction (an ``INSTRUCTION`` match)."""
    lhs = dims(shapes[dot.group(4).split(",")[0].strip(" %")])
    contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", dot.group(4))
    k = 1
    for d in filter(None, contract.group(1).split(",") if contract else []):
        k *= lhs[int(d)]
    return 2.0 * k * nbytes(dot.group(2)) / DTYPE_BYTES.get(dot.group(2).split("[")[0], 4)


def matmul_flops(hlo_text: str) -> float:
    """FLOPs of all ``dot`` instructions of an optimized HLO module (fused or not; no loops)."""
    comps, _ = hlo_computations(hlo_text)
    matches = [m for lines in comps.values() for m in map(INSTRUCTION.match, lines) if m]
    shapes = {m.group(1): m.group(2) for m in matches}
    return sum(dot_flops(m, shapes) for m in matches if m.group(3) == "dot")


def xla_costs(jitted, *args) -> tuple[dict, object]:
    """XLA's FLOPs and bytes accessed of ``jitted(*args)`` (the compiled module's cost analysis), the FLOPs of
    its matrix products alone (the ``dot`` instructions of the optimized HLO), and the compiled executable."""
    compiled = jitted.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "matmul_flops": matmul_flops(compiled.as_text())}, compiled


# ------------------------------------------------------------------------------------------ weights


def fill_zero_weights(params, std: float = 0.1, seed: int = 0):
    """Every all-zero parameter (the residual output projections, norm biases) gets ``std * N(0, 1)``.

    A fresh model gives zero forces (every residual output projection starts at zero); the timing
    does not depend on the values, but this keeps every path of the model carrying work and gradient.
    """
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def fill(x):
        x = np.asarray(x)
        return (std * rng.standard_normal(x.shape)).astype(x.dtype) if not np.any(x) else x

    return jax.tree.map(fill, params)


def perturb_weights(params, seed: int = 0, scale: float = 0.1):
    """Every parameter plus ``scale * N(0, 1)`` (jax arrays, the parameters' dtype)."""
    import jax

    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


# ------------------------------------------------------------------------------------------ output


def write_json(info: dict, path: str | Path, *also: Path | None) -> Path:
    """Writes ``info`` (indented, one trailing newline), creating the folder, and says so (with ``also``,
    e.g. the plot next to it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1) + "\n")
    print("wrote " + " and ".join(str(p) for p in (path, *also) if p))
    return path


def print_table(title: str, head: list[str], rows: list[list], notes: str | None = None) -> None:
    """A right-aligned text table; cells are strings (formatted by the caller) or numbers; ``"|"`` in
    ``head`` marks a column separator."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells if i < len(r)]) for i, h in enumerate(head)]
    line = lambda r: " ".join(c.rjust(w) if h != "|" else "|" for c, w, h in zip(r, widths, head))
    print(f"\n{title}")
    print(line(head))
    print("-" * len(line(head)))
    for r in cells:
        print(line(r + [""] * (len(head) - len(r))))
    if notes:
        print(notes)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Tight layout, 120 dpi PNG, figure closed."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


# ------------------------------------------------------------------------------------------ sides in processes


def spread(values: list[float]) -> dict:
    """Median, min, max and the number of values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


class Side:
    """One benchmark side (an implementation, or a checkout of dpa4-jax) in a process of its own.

    The process runs ``python SCRIPT --worker ...`` under ``taskset -c CPUS`` with its own
    ``PYTHONPATH`` (another checkout's ``dpa4_jax``) and answers JSON requests, one line each,
    through ``serve``. Sides that share a machine are asked in turn (``alternate``), never at
    once, so that each runs alone on the same cores, with none of the other's allocator or
    page-cache state in its process.
    """

    def __init__(self, name: str, argv: list[str], cpus: list[int], python: str | None = None,
                 pythonpath: str | Path | None = None):
        env = dict(os.environ, PYTHONPATH=str(Path(pythonpath or ROOT).resolve()))
        cmd = ["taskset", "-c", ",".join(map(str, cpus)), python or sys.executable, *argv]
        self.name, self.command = name, " ".join(cmd)
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self.ask()  # the worker's first line: what it built

    def ask(self, request: dict | None = None) -> dict:
        if request is not None:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark side {self.name!r} ended (exit {self.process.wait()}): {self.command}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"benchmark side {self.name!r}: {answer['error']}")
        return answer

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait()


def alternate(sides: list[Side], requests) -> dict[str, list[dict]]:
    """Every request of ``requests`` to every side in turn (A B A B ...); the answers per side."""
    answers = {s.name: [] for s in sides}
    for request in requests:
        for side in sides:
            answers[side.name].append(side.ask(request))
    return answers


def serve(ready: dict, handlers: dict) -> None:
    """The worker's loop: announce ``ready``, then answer ``{"cmd": name, ...}`` with ``handlers[name](...)``.

    Answers go to the process's original stdout; anything else printed (by this code, JAX or
    PyTorch, Python or C) goes to stderr, so it cannot break the protocol.
    """
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def say(answer):
        out.write(json.dumps(answer) + "\n")
        out.flush()

    say(ready)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            say(handlers[request.pop("cmd")](**request))
        except Exception as e:  # reported to the driver, which stops with it
            say({"error": f"{type(e).__name__}: {e}"})


def timed_call(fn) -> dict:
    """Wall and process CPU seconds of one call of ``fn`` (results awaited)."""
    import jax

    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c}
