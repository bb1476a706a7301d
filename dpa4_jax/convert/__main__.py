"""``python -m dpa4_jax.convert RUN OUT.dp [--precision float32|float64]``: a trained model as a DeePMD-kit
3.2.0 model file (see :mod:`dpa4_jax.convert`)."""

from __future__ import annotations

import argparse

from dpa4_jax.convert import DEEPMD_VERSION, DP_SUFFIXES, save_deepmd
from dpa4_jax.load import load_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpa4_jax.convert",
                                     description=f"Export a dpa4-jax model as a DeePMD-kit {DEEPMD_VERSION} file.")
    parser.add_argument("model", help="a train.py work directory, or a saved model directory (variables.msgpack)")
    parser.add_argument("output", help=f"the DeePMD-kit model file to write ({', '.join(DP_SUFFIXES)})")
    parser.add_argument("--precision", choices=("float32", "float64"),
                        help="DeePMD-kit's precision (default: that of the weights)")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    path = save_deepmd(model.config, model.variables, args.output, args.precision)
    print(f"{path}: DeePMD-kit {DEEPMD_VERSION} DPA4 model of {args.model} ({model.config.ntypes} elements, "
          f"bridging {model.config.bridging})")


if __name__ == "__main__":
    main()
