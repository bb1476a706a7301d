"""``python -m dpa4_jax.relax``: see :mod:`dpa4_jax.relax.cli`."""

import sys

from dpa4_jax.relax.cli import main

if __name__ == "__main__":
    sys.exit(main())
