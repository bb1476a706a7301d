"""Logging for the command-line tools: the project's own messages at INFO, JAX's at WARNING.

The root logger stays at WARNING: at INFO every library would talk, JAX first of all
(``Unable to initialize backend 'tpu'`` on every start on a machine without TPUs).
"""

from __future__ import annotations

import logging

PROJECT = "dpa4_jax"
QUIET = ("jax", "jaxlib", "absl")  # libraries held at WARNING even if root is lowered


def setup_logging(level: int = logging.INFO) -> None:
    """Send the project's messages at ``level`` and above, and every library's warnings, to stderr."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger(PROJECT).setLevel(level)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
