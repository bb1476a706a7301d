#!/usr/bin/env python3
"""Train DPA4: ``python train.py --config configs/air_mptrj.yaml [--workdir DIR] [--set key=value ...]``.

``--init-model PATH`` fine-tunes a pretrained model (a dpa4-jax run directory or
saved model, or a DeePMD-kit model): its architecture, the config's type map and
data (see dpa4_jax.train.finetune). Resumes from the newest checkpoint in the
work directory (a fine-tuning run too: the init model is then not read again);
SIGINT/SIGTERM save a checkpoint first. The final model (EMA weights unless
``training.final_weights: raw``) is loaded with ``DPA4Calculator.load(workdir)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--workdir", default=None, help="output directory (default: runs/<config name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set training.steps=100 (repeatable)")
    parser.add_argument("--init-model", default=None, metavar="PATH",
                        help="fine-tune this pretrained model (dpa4-jax run or model directory, DeePMD-kit model)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from dpa4_jax.logs import setup_logging

    setup_logging()
    from dpa4_jax.config import ConfigError, apply_overrides, parse_config, read_yaml

    try:
        resolved = apply_overrides(read_yaml(args.config), args.overrides)  # stored with the run
        if args.init_model:
            from dpa4_jax.train.finetune import adopt_init_model

            resolved = adopt_init_model(resolved, args.init_model, args.config)
        config = parse_config(resolved, args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    if config.training.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # Compiled steps persist in the work directory: a resumed run skips their compilation.
        jax.config.update("jax_compilation_cache_dir", str((workdir / "xla_cache").resolve()))
    from dpa4_jax.train.loop import fit

    try:
        result = fit(config, workdir, yaml.safe_dump(resolved, sort_keys=False),
                     base=Path(args.config).resolve().parent, progress=not args.quiet)
    except ConfigError as e:  # found once the model exists (training.freeze names, training.energy_bias elements)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result:
        print("final validation: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    print(f"model and learning curve in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
