"""Fine-tune CSM on your recordings: full fine-tuning or LoRA, checkpoints, resume, export.

The command is csm_jax/commands/finetune.py, also run as `csm-jax finetune`; --help lists its options.
"""

from csm_jax.cli import command

if __name__ == "__main__":
    command("finetune")
