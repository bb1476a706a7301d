"""Phonons with a demo-sized model: FC3 + κ batched vs one supercell at a time, and the Hessian of 250 atoms.

What runs (float64, the demo config's model with Si in its type map, random weights perturbed so that forces are
not zero; the numbers measure speed and agreement, not physics):

1. for diamond Si (conventional cell, 2x2x2 supercell of 64 atoms, 111 displaced supercells) and a low-symmetry
   crystal (trigonal Si3, P3_121, 2x2x2 supercell of 24 atoms): the forces of phono3py's displaced supercells
   (a) many per model call (``dpa4_jax.batched.forces_of_many``) and (b) one at a time through the ASE
   calculator, as the protocol scripts do; FC2, FC3 and κ (Wigner RTA, 300 K) from each; wall and process CPU
   time of each force pass (compilation included, then a second, warm pass), and the largest κ difference;
2. in a child process (its own peak RSS): the exact Hessian of a 250-atom Si supercell (5x5x5 primitive cells)
   by ``physics.hessian`` (what ``DPA4Calculator.get_hessian`` calls), its compilation and run times and the
   child's peak RSS.

    taskset -c 0,1 python benchmarks/phonons.py          # pins itself to --cores anyway

Writes ``benchmarks/results/phonons.json`` (``--only`` one part: merged into an existing file, with that part's
machine and arguments). The machine is shared: the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import machine, write_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def pin(cores: str):
    """Pin this process (and the XLA threads it will start) to ``cores`` ("0,1")."""
    os.sched_setaffinity(0, {int(c) for c in cores.split(",")})


def demo_calc(seed: int = 0):
    """The demo config's model (configs/demo.yaml) with Si added to its type map, random weights perturbed."""
    import jax
    import yaml

    from dpa4_jax.calculator import DPA4Calculator
    from dpa4_jax.config import ModelConfig, from_dict

    model = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["model"]
    model["type_map"] = [*model["type_map"], "Si"]
    calc = DPA4Calculator.from_config(from_dict(ModelConfig, model, "configs/demo.yaml"), seed=seed, dtype="float64")
    leaves, tree = jax.tree.flatten(calc.params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    calc.params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                            for k, x in zip(keys, leaves)])
    return calc


def crystals():
    from ase import Atoms
    from ase.build import bulk

    x = 0.22
    trigonal = Atoms("Si3", scaled_positions=[[x, 0, 1 / 3], [0, x, 2 / 3], [-x, -x, 0]],
                     cell=[[4.7, 0, 0], [-2.35, 4.7 * 3**0.5 / 2, 0], [0, 0, 5.0]], pbc=True)
    return {"Si diamond": (bulk("Si", "diamond", a=5.43, cubic=True), [2, 2, 2]),
            "Si3 trigonal P3_121": (trigonal, [2, 2, 2])}


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def kappa_of(ph3, forces, mesh):
    import numpy as np

    from dpa4_jax import phonons

    ph3.forces = forces
    ph3.produce_fc2(symmetrize_fc2=True)
    ph3.produce_fc3(symmetrize_fc3r=True)
    return np.asarray(phonons.conductivity(ph3, [300.0]).kappa[0, 0])


def displacements(model, name, atoms, supercell, mesh, batch_size):
    import numpy as np

    from dpa4_jax import phonons
    from dpa4_jax.calculator import DPA4Calculator

    # a calculator of its own: its padded size only grows, and another crystal's would be timed here
    calc = DPA4Calculator(model.config, model.variables, dtype="float64")

    ph3 = phonons.init_phono3py(atoms, supercell, mesh=mesh, min_length=2 * calc.config.rcut)
    cells = ph3.supercells_with_displacements
    result = {"supercells": len(cells), "atoms_per_supercell": len(cells[0]), "mesh": list(mesh)}

    def ase_pass():
        out = []
        for c in cells:
            a = phonons.to_ase(c)
            a.calc = calc
            out.append(a.get_forces())
        return np.array(out)

    for label, run in (("batched", lambda: phonons.supercell_forces(calc, cells, batch_size)), ("ase", ase_pass)):
        forces, wall, cpu = timed(run)  # the first pass compiles
        _, warm_wall, warm_cpu = timed(run)
        result[label] = {"wall_s": wall, "cpu_s": cpu, "warm_wall_s": warm_wall, "warm_cpu_s": warm_cpu}
        result[label]["kappa_300K"] = kappa_of(phonons.init_phono3py(atoms, supercell, mesh=mesh), forces,
                                               mesh).tolist()
        print(f"{name}: {label} {len(cells)} supercells: {wall:.1f} s wall ({cpu:.1f} s CPU) first, "
              f"{warm_wall:.1f} s ({warm_cpu:.1f} s CPU) warm", flush=True)
    k_b, k_a = np.array(result["batched"]["kappa_300K"]), np.array(result["ase"]["kappa_300K"])
    result["kappa_max_relative_difference"] = float(np.abs(k_b - k_a).max() / np.abs(k_a).max())
    result["speedup_warm"] = result["ase"]["warm_wall_s"] / result["batched"]["warm_wall_s"]
    result["speedup_first"] = result["ase"]["wall_s"] / result["batched"]["wall_s"]
    return result


def hessian_child(chunk_size: int) -> dict:
    """Runs in the child process: the Hessian of a 250-atom Si supercell (compilation timed apart, one run)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from ase.build import bulk

    from dpa4_jax import physics

    calc = demo_calc()
    atoms = bulk("Si", "diamond", a=5.43) * (5, 5, 5)
    graph = jax.tree.map(jnp.asarray, calc.graph(atoms))
    compiled, compile_wall, compile_cpu = timed(
        lambda: physics.hessian.lower(calc.model, calc.variables, graph, chunk_size=chunk_size).compile())
    h, wall, cpu = timed(lambda: np.asarray(compiled(calc.variables, graph)))
    n = 3 * len(atoms)
    return {"atoms": len(atoms), "padded_atoms": int(graph.nodes["species"].shape[0]), "chunk_size": chunk_size,
            "compile_wall_s": compile_wall, "compile_cpu_s": compile_cpu, "wall_s": wall, "cpu_s": cpu,
            "asymmetry": float(np.abs(h[:n, :n] - h[:n, :n].T).max() / np.abs(h).max()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cores", default="0,1")
    p.add_argument("--mesh", type=int, nargs=3, default=[9, 9, 9])
    p.add_argument("--batch-size", type=int, help="supercells per call (default: ~512 atoms a call)")
    p.add_argument("--chunk-size", type=int, default=4, help="Hessian columns per vmapped chunk")
    p.add_argument("--only", choices=["displacements", "hessian"])
    p.add_argument("--hessian-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--output", default=str(HERE / "results" / "phonons.json"))
    args = p.parse_args()
    pin(args.cores)
    if args.hessian_child:
        print(json.dumps(hessian_child(args.chunk_size)))
        return
    record = {"machine": {**machine(), "cores_pinned": sorted(os.sched_getaffinity(0)),
                          "load_average": os.getloadavg(), "date": datetime.datetime.now().isoformat(timespec="seconds")},
              "args": vars(args)}
    if args.only != "hessian":
        model = demo_calc()
        record["model"] = {"parameters": model.num_params, "rcut": model.config.rcut, "dtype": "float64"}
        record["displacements"] = {name: displacements(model, name, atoms, supercell, tuple(args.mesh),
                                                       args.batch_size)
                                   for name, (atoms, supercell) in crystals().items()}
    if args.only != "displacements":
        child = subprocess.run([sys.executable, __file__, "--hessian-child", "--cores", args.cores,
                                "--chunk-size", str(args.chunk_size)], capture_output=True, text=True, check=True)
        record["hessian"] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"Hessian {record['hessian']}", flush=True)
    record["machine"]["load_average_after"] = os.getloadavg()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.only and output.exists():  # one part rerun: the other part's results (and machine) are kept
        kept = json.loads(output.read_text())
        record = {**kept, **{k: v for k, v in record.items() if k not in ("machine", "args")},
                  f"{args.only}_machine": record["machine"], f"{args.only}_args": record["args"]}
    write_json(record, output)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
