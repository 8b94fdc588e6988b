"""`python -m csm_jax COMMAND ...`: the `csm-jax` command, where its console script is not on the PATH."""

from csm_jax.cli import main

main()
