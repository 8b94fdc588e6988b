"""Text to speech with CSM-1B: one WAV (24 kHz) per utterance.

The command is csm_jax/commands/synthesize.py, also run as `csm-jax synthesize`; --help lists its options.
"""

from csm_jax.cli import command

if __name__ == "__main__":
    command("synthesize")
