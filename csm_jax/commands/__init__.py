"""The command-line commands: NAME.py holds `Args` (the flags, parsed by tyro) and `main(args)`.

`csm-jax NAME` (csm_jax/cli.py) and scripts/ run them; COMMANDS in csm_jax/cli.py lists them.
"""
