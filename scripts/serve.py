"""Serve CSM over HTTP with OpenAI's speech API: POST /v1/audio/speech, GET /v1/models, GET /health.

The command is csm_jax/commands/serve.py, also run as `csm-jax serve`; --help lists its options.
"""

from csm_jax.cli import command

if __name__ == "__main__":
    command("serve")
