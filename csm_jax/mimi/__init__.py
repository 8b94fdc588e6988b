"""Kyutai's Mimi codec in JAX: 24 kHz mono audio <-> 32 codebooks at 12.5 Hz (1920 samples per frame)."""

from csm_jax.mimi.checkpoint import load_mimi, mimi_params_from_tensors
from csm_jax.mimi.model import (MimiConfig, decode, decode_step, encode, encode_step, init_decoder_state,
                                init_encoder_state, reset_state_rows)

__all__ = ["MimiConfig", "load_mimi", "mimi_params_from_tensors", "encode", "decode", "encode_step", "decode_step",
           "init_encoder_state", "init_decoder_state", "reset_state_rows"]
