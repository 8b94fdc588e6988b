"""Talk with CSM: your speech -> silero-vad -> faster-whisper -> any OpenAI-compatible LLM -> CSM's voice.

The command is csm_jax/commands/converse.py, also run as `csm-jax converse`; --help lists its options.
"""

from csm_jax.cli import command

if __name__ == "__main__":
    command("converse")
