"""The Matbench Discovery protocols with a DPA4 model (``python -m dpa4_jax.matbench COMMAND ...``).

Commands, one module each:

- ``discovery``: relax the WBM initial structures (``dpa4_jax.matbench.discovery``);
- ``score``: the discovery metrics and structure RMSD of such predictions (``dpa4_jax.matbench.discovery``);
- ``kappa``: lattice thermal conductivity of the PhononDB structures and κ_SRME (``dpa4_jax.matbench.kappa``).

The metrics are the ``matbench-discovery`` package's own functions (the optional extra ``matbench``); the data
are the user's download.
"""
