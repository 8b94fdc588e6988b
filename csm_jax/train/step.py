"""One training step's math: the optimizer (optax AdamW with warmup + cosine decay, global-norm clipping, gradient
accumulation), what is trainable, and the step (trainable, opt_state, frozen, batch) -> (trainable, opt_state,
metrics), a pure function of its inputs. Where it runs is csm_jax.train.placement; the loop around it (data,
files, progress, resume) csm_jax.train.trainer.

What is trainable: every parameter (full), all but the backbone side (frozen backbone: the backbone
transformer, the text and audio embeddings and the codebook-0 head stay), or only LoRA adapters. Parameters stay
fp32 masters (and so does the optimizer state); the transformers compute in `TrainConfig.compute_dtype`, read
by checkpoints.compute_dtype ("auto": its default for CSM).

Errors about settings are `SettingError`s that name each setting as `field` (a field of TrainConfig or of
trainer.RunOptions), so that a command line can show them by its own names for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import optax

from csm_jax.checkpoints import compute_dtype
from csm_jax.csm import CsmConfig
from csm_jax.train.lora import TARGETS, check_targets, init_lora, merge
from csm_jax.train.loss import csm_loss

BACKBONE_SIDE = ("backbone", "text_embed", "audio_embed", "c0_head")


class SettingError(ValueError):
    """A training setting that cannot work, or settings that do not go together. The message names each
    setting in backquotes, `batch_size`, as the fields of TrainConfig and trainer.RunOptions are named."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer updates
    batch_size: int = 4
    accumulate: int = 1  # micro-batches per update (their gradients averaged)
    learning_rate: float = 2e-5
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.01  # on matrices only, not norms
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    depth_ratio: float = 1 / 16  # compute amortization: part of the frames the depth decoder trains on
    context_loss: bool = True  # context turns' audio is a target too (as transformers' processor labels it)
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = TARGETS
    freeze_backbone: bool = False
    compute_dtype: str = "auto"  # auto | float32 | bfloat16 (checkpoints.compute_dtype)
    remat: bool = False  # recompute layer activations in the backward pass (long sequences at full size)
    seed: int = 0

    def check(self) -> "TrainConfig":
        if self.steps < 1 or self.batch_size < 1 or self.accumulate < 1:
            raise SettingError("`steps`, `batch_size` and `accumulate` must be at least 1")
        if not 0 < self.learning_rate < float("inf"):  # a negative one would climb the loss
            raise SettingError(f"`learning_rate` must be above 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise SettingError(f"`warmup_steps` must be 0 or more, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SettingError(f"`min_lr_ratio` must lie in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.weight_decay < float("inf"):
            raise SettingError(f"`weight_decay` must be 0 or more, got {self.weight_decay}")
        if not 0 < self.clip_norm < float("inf"):  # 0 would scale every update to nothing
            raise SettingError(f"`clip_norm` must be above 0, got {self.clip_norm}")
        if not 0 < self.depth_ratio <= 1:
            raise SettingError(f"`depth_ratio` must lie in (0, 1], got {self.depth_ratio}")
        if self.lora_rank < 0:
            raise SettingError(f"`lora_rank` must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        try:
            if self.compute_dtype != "auto":  # "auto" is known good; resolving it would start JAX's backend
                self.dtype()
        except ValueError as e:
            raise SettingError(f"`compute_dtype`: {e}") from None
        if self.lora_rank:
            try:
                check_targets(self.lora_targets)
            except ValueError as e:
                raise SettingError(f"`lora_targets`: {e}") from None
        return self

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 1.0

    def dtype(self):
        """The dtype the transformers compute in (checkpoints.compute_dtype's rule for CSM)."""
        return compute_dtype(self.compute_dtype)


def schedule(tc: TrainConfig):
    warmup = min(tc.warmup_steps, tc.steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, max(warmup, 0), max(tc.steps, warmup + 1),
                                              tc.learning_rate * tc.min_lr_ratio)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    decay = lambda tree: jax.tree.map(lambda a: a.ndim >= 2, tree)  # noqa: E731
    opt = optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                      optax.adamw(schedule(tc), tc.b1, tc.b2, weight_decay=tc.weight_decay, mask=decay))
    return optax.MultiSteps(opt, tc.accumulate) if tc.accumulate > 1 else opt


def split_params(cfg: CsmConfig, params: dict, tc: TrainConfig, key=None) -> tuple[dict, dict]:
    """-> (trainable, frozen). LoRA: trainable is the adapters, frozen all of `params`."""
    if tc.lora_rank:
        parts = ("decoder",) if tc.freeze_backbone else ("backbone", "decoder")
        key = key if key is not None else jax.random.key(tc.seed)
        return init_lora(cfg, key, tc.lora_rank, tc.lora_targets, parts=parts), params
    frozen_keys = BACKBONE_SIDE if tc.freeze_backbone else ()
    return ({k: v for k, v in params.items() if k not in frozen_keys},
            {k: v for k, v in params.items() if k in frozen_keys})


def joined(cfg: CsmConfig, trainable: dict, frozen: dict, tc: TrainConfig, merged: bool = False):
    """-> (params, lora or None); `merged` folds LoRA into the parameters (for export and generation)."""
    if tc.lora_rank:
        return (merge(cfg, frozen, trainable, tc.lora_scale), None) if merged else (frozen, trainable)
    return {**frozen, **trainable}, None


def loss(cfg: CsmConfig, tc: TrainConfig, trainable, frozen, batch):
    """-> (loss, metrics) of csm_jax.train.loss.csm_loss for the parameters `trainable` and `frozen` make."""
    params, lora = joined(cfg, trainable, frozen, tc)
    return csm_loss(params, cfg, batch, lora, tc.lora_scale, tc.dtype(), tc.remat)


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)))


def update(cfg: CsmConfig, tc: TrainConfig, trainable, opt_state, frozen, batch):
    """One micro-batch: gradients of the loss, the optimizer's update (with accumulation, every `accumulate`-th
    call changes the parameters). -> (trainable, opt_state, metrics with grad_norm)."""
    (_, aux), grads = jax.value_and_grad(partial(loss, cfg, tc), has_aux=True)(trainable, frozen, batch)
    updates, opt_state = make_optimizer(tc).update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, dict(aux, grad_norm=global_norm(grads))


def abstract_state(cfg: CsmConfig, tc: TrainConfig):
    """Shapes of (trainable, opt_state, frozen) for (cfg, tc), computed without allocating."""
    def build():
        from csm_jax.csm import init_params

        trainable, frozen = split_params(cfg, init_params(cfg, jax.random.key(0)), tc)
        return trainable, make_optimizer(tc).init(trainable), frozen
    return jax.eval_shape(build)
