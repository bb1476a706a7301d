"""Where the time of DPA4-Air's forward pass or E+F+V goes, per XLA operation (CPU).

One call of the compiled function (fcc Cu, ``--atoms``, float32, one pinned thread as in
``inference.py``) runs under ``jax.profiler.trace``; the trace's events (one per XLA
thunk: a fusion, a matmul, a scatter) are read back with ``jax.profiler.ProfileData``
and matched to the optimized HLO (``compiled.as_text()``) to sort them:

* by kind: matmul (``dot`` inside the fusion), scatter, gather, copy/transpose,
  concatenate/pad/slice, other elementwise;
* by pass: forward or reverse, from the ``op_name`` metadata (``transpose(jvp(...))`` is the
  reverse pass; matmul fusions carry no metadata, so a matmul contracting its right operand's
  second axis, ``x @ W.T``, counts as reverse: a few forward ones do too, 6% of the forward pass's time);
* by model part (the ``op_name`` path, block indices merged), the largest first;
* matmuls by shape, with their GFLOP/s.

The bytes each operation reads and writes (from its HLO shapes) are summed the same way.

    python benchmarks/op_profile.py --atoms 32 --function efv

Writes ``benchmarks/results/op_profile_<function>_<atoms>.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import inference

DTYPE_BYTES = {"f64": 8, "s64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}
INSTRUCTION = re.compile(r"(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--atoms", type=int, default=32, help="atoms of the fcc Cu cell (4 a b c)")
    p.add_argument("--function", choices=["forward", "efv"], default="efv")
    p.add_argument("--config", default=str(ROOT / "configs" / "air_mptrj.yaml"))
    p.add_argument("--top", type=int, default=25, help="model parts and matmul shapes listed")
    p.add_argument("--output", default=None)
    return p.parse_args()


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


def classify(line: str, body: list[str], shapes: dict) -> tuple[str, str, str, float]:
    """``(kind, pass, model part, matmul FLOPs)`` of an entry instruction and its fused body
    (``shapes``: the shape of every instruction of the module, by name)."""
    ops = {m.group(3) for m in map(INSTRUCTION.match, body) if m}
    names = re.findall(r'op_name="([^"]*)"', " ".join([line] + body))
    part = names[0] if names else "?"
    reverse = "transpose(" in part
    flops = 0.0
    if "dot" in ops:
        kind = "matmul"
        dot = next(m for m in map(INSTRUCTION.match, body) if m and m.group(3) == "dot")
        flops = dot_flops(dot, shapes)
        reverse = reverse or "rhs_contracting_dims={1}" in dot.group(4)
    elif "scatter" in ops:
        kind = "scatter"
    elif "gather" in ops:
        kind = "gather"
    elif ops & {"transpose", "copy"}:
        kind = "copy/transpose"
    elif ops & {"concatenate", "pad", "slice", "dynamic-slice", "dynamic-update-slice"}:
        kind = "concatenate/pad/slice"
    else:
        kind = "elementwise/other"
    part = re.sub(r"_\d+/", "_*/", re.sub(r"(transpose\()?jvp\(\w+\)\)?/|jit\([^)]*\)/", "", part))
    return kind, "reverse" if reverse else "forward", part, flops


def main():
    args = parse_args()
    threads = inference.set_threads(1)
    import jax
    import jax.numpy as jnp
    import roofline

    from dpa4_jax import physics
    from dpa4_jax.calculator import DPA4Calculator
    from dpa4_jax.model import DPA4

    calc = DPA4Calculator.from_config(args.config, seed=0, dtype="float32")
    variables = jax.device_put(dict(calc.variables, params=inference.fill_zero_weights(calc.params)))
    model = DPA4(calc.config, param_dtype=jnp.float32)
    graph = jax.device_put(calc.graph(roofline.fcc_cell(args.atoms)))
    fn = physics.energy if args.function == "forward" else physics.energy_forces_virial
    compiled = jax.jit(lambda v, g: fn(model, v, g)).lower(variables, graph).compile()
    jax.block_until_ready(compiled(variables, graph))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            jax.block_until_ready(compiled(variables, graph))
        profile = jax.profiler.ProfileData.from_file(str(next(Path(trace_dir).rglob("*.xplane.pb"))))
        durations = collections.Counter()
        for plane in profile.planes:
            for line in plane.lines:
                for event in line.events:
                    if not event.name.startswith("ThunkExecutor") and not event.name.startswith("$"):
                        durations[event.name] += event.duration_ns * 1e-9

    comps, entry = hlo_computations(compiled.as_text())
    entry_lines = {m.group(1): (m, line) for line in comps[entry] if (m := INSTRUCTION.match(line))}
    shapes = {m.group(1): m.group(2) for lines in comps.values() for m in map(INSTRUCTION.match, lines) if m}
    groups = {key: collections.defaultdict(lambda: [0.0, 0.0, 0]) for key in ("kind", "pass", "part", "matmul")}
    flops_of = collections.Counter()
    for name, seconds in durations.items():
        if name not in entry_lines:
            continue
        m, line = entry_lines[name]
        called = re.search(r"calls=%([\w.\-]+)", line)
        body = comps.get(called.group(1), []) if called else [line]
        kind, direction, part, flops = classify(line, body, shapes)
        operands = re.findall(r"%([\w.\-]+)", m.group(4).split(")")[0])
        moved = nbytes(m.group(2)) + sum(nbytes(shapes.get(o, "")) for o in operands)
        keys = {"kind": kind, "pass": f"{direction} {'matmul' if kind == 'matmul' else 'other'}",
                "part": f"{direction}: {part}" if kind != "matmul" else None,
                "matmul": f"{m.group(2).split('{')[0]} <- {' '.join(shapes.get(o, '?').split('{')[0] for o in operands)}"
                if kind == "matmul" else None}
        for group, key in keys.items():
            if key is not None:
                row = groups[group][key]
                row[0] += seconds
                row[1] += moved
                row[2] += 1
        if kind == "matmul":
            flops_of[keys["matmul"]] += flops
    total = sum(r[0] for r in groups["kind"].values())
    result = {"atoms": args.atoms, "edges": int(graph.n_edge[0]), "function": args.function, "threads": threads,
              "total_op_s": total, "groups": {}}
    for group, rows in groups.items():
        listed = sorted(rows.items(), key=lambda kv: -kv[1][0])[: args.top if group in ("part", "matmul") else None]
        result["groups"][group] = [
            {"key": k, "seconds": s, "fraction": s / total, "bytes": b, "count": n,
             **({"gflops": flops_of[k] / s / 1e9, "flops": flops_of[k]} if group == "matmul" else {})}
            for k, (s, b, n) in listed]
        print(f"\n--- by {group} ({args.function}, {args.atoms} atoms, {result['edges']} edges; {total:.3f} s of ops)")
        for r in result["groups"][group]:
            rate = f" {r['gflops']:6.1f} GFLOP/s" if "gflops" in r else ""
            print(f"{r['seconds'] * 1e3:9.2f} ms {100 * r['fraction']:5.1f}% {r['bytes'] / 1e6:9.1f} MB {r['count']:4d}x"
                  f"{rate}  {r['key'][:110]}")
    out = Path(args.output or HERE / "results" / f"op_profile_{args.function}_{args.atoms}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
