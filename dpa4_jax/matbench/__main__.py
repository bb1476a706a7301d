"""``python -m dpa4_jax.matbench {discovery,score,kappa} ...``: hands the rest of the command line to the
command's module."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"discovery": "dpa4_jax.matbench.discovery", "score": "dpa4_jax.matbench.discovery",
            "kappa": "dpa4_jax.matbench.kappa"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m dpa4_jax.matbench {{{','.join(COMMANDS)}}} ... (--help after a command for its "
              "options)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return module.main(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
