"""Fine-tuning CSM: data (Mimi-code cache, bucketed batches), the training loss, LoRA, the step's math (step.py),
its placement on a mesh (placement.py), the loop (trainer.py), orbax checkpoints and export to transformers'
layout. csm_jax/commands/finetune.py (csm-jax finetune, scripts/finetune.py) drives it."""
