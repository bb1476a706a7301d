"""Where the time of DPA4-Air's forward pass, E+F+V or training gradient goes, per XLA operation (CPU).

One call of the compiled function (fcc Cu, ``--atoms``, float32, one pinned thread,
``common.set_threads``) runs under ``jax.profiler.trace``; the trace's events (one per XLA
thunk: a fusion, a matmul, a scatter) are read back with ``jax.profiler.ProfileData``
and matched to the optimized HLO (``compiled.as_text()``) to sort them:

* by kind: matmul (``dot`` inside the fusion), scatter, gather, copy/transpose,
  concatenate/pad/slice, other elementwise;
* by pass: forward or reverse, from the ``op_name`` metadata (``transpose(jvp(...))`` is the
  reverse pass; matmul fusions carry no metadata, so a matmul contracting its right operand's
  second axis, ``x @ W.T``, counts as reverse: a few forward ones do too, 6% of the forward pass's time);
* by pass, kind and model part (the ``op_name`` path, block indices merged), the largest first;
* matmuls by shape, with their GFLOP/s.

The bytes each operation reads and writes (from its HLO shapes) are summed the same way.

    python benchmarks/op_profile.py --atoms 108 --function efv
    python benchmarks/op_profile.py --atoms 108 --function train

Writes ``benchmarks/results/op_profile_<function>_<atoms>.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
from pathlib import Path

from common import INSTRUCTION, RESULTS, dot_flops, hlo_computations, nbytes, set_threads, write_json
from workloads import AIR_CONFIG


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--atoms", type=int, default=32, help="atoms of the fcc Cu cell (4 a b c)")
    p.add_argument("--function", choices=["forward", "efv", "train"], default="efv",
                   help="train: the loss and parameter gradient of one labelled frame (workloads.train_case)")
    p.add_argument("--config", default=AIR_CONFIG)
    p.add_argument("--top", type=int, default=25, help="model parts and matmul shapes listed")
    p.add_argument("--output", default=None)
    return p.parse_args()


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
    threads = set_threads(1)
    import jax

    import workloads

    if args.function == "train":
        case = workloads.train_case(args.config, args.atoms)
    else:
        calc, variables = workloads.filled_model(args.config)
        case = workloads.size_cases(calc.config, jax.device_put(variables), args.atoms, functions=[args.function])[0]
    compiled = case.compiled
    jax.block_until_ready(case())
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            jax.block_until_ready(case())
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
                "part": f"{direction} {kind}: {part}" if kind != "matmul" else None,
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
    result = {"atoms": args.atoms, "edges": case.edges, "function": args.function, "threads": threads,
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
    write_json(result, args.output or RESULTS / f"op_profile_{args.function}_{args.atoms}.json")


if __name__ == "__main__":
    main()
