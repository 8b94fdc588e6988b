"""Fine-tuning CSM: data (Mimi-code cache, bucketed batches), the training loss, LoRA, the optax step,
orbax checkpoints and export to transformers' layout. scripts/finetune.py drives it."""
