"""Convert Sesame's torch-only `ckpt.pt` (a pickled state dict) into `model.safetensors` in the same layout.

The command is csm_jax/commands/convert.py, also run as `csm-jax convert`; --help lists its options.
"""

from csm_jax.cli import command

if __name__ == "__main__":
    command("convert")
