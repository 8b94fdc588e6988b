"""Mimi as a speech codec: audio file <-> int32 codes (num_codebooks, frames) at 12.5 Hz.

The command is csm_jax/commands/codec.py, also run as `csm-jax codec`; --help lists its options.
"""

from csm_jax.cli import command

if __name__ == "__main__":
    command("codec")
