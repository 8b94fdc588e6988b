"""The loaded model at the bottom of everything: CSM parameters and config, Mimi parameters, the tokenizer, and
the helpers every part shares (Mimi encode/decode of whole clips, context segments to codes, prompt rows).
The engine, the generator, dialogues and the server use it; it uses none of them.

    bundle = ModelBundle("sesame/csm-1b")          # or a local folder; dtype and int8 quantization at load
    codes = bundle.encode_audio(audio_24k)          # (32, frames)
    tokens, mask = bundle.prompt(context, speaker=0, text="Hello.", max_frames=125)
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from csm_jax.audio import check_audio
from csm_jax.checkpoints import load_csm
from csm_jax.csm import CsmConfig
from csm_jax.mimi import decode, encode, load_mimi, mimi_params_from_tensors
from csm_jax.quantize import quantize_csm
from csm_jax.text import FRAME_SAMPLES, Segment, Tokenizer, build_prompt


def bucket(n: int, lo: int = 1) -> int:
    """Next power of two >= n (>= lo): padded sizes keep the number of compiled programs small."""
    b = lo
    while b < n:
        b *= 2
    return b


class ModelBundle:
    """A loaded CSM + Mimi + tokenizer: parameters, config, and the audio and prompt helpers every part uses."""

    def __init__(self, checkpoint: str = "sesame/csm-1b", mimi: str | None = None, tokenizer: str | None = None,
                 dtype=None, quantize: str | None = None):
        self.ckpt = load_csm(checkpoint, dtype)
        self.ckpt.params = quantize_csm(self.ckpt.params, quantize)  # "int8": csm_jax.quantize; None: as loaded
        self.cfg, self.params = self.ckpt.config, self.ckpt.params
        if self.ckpt.codec_tensors is not None and mimi is None:
            _, self.mimi = mimi_params_from_tensors(self.ckpt.codec_tensors, f"{self.ckpt.source} (codec_model.*)")
        elif mimi is not None:
            _, self.mimi = load_mimi(mimi)
        else:
            try:
                _, self.mimi = load_mimi("kyutai/mimi")
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{self.ckpt.source} holds no Mimi weights (no codec_model.*: Sesame's "
                                        f"layout), so Mimi comes from kyutai/mimi, but {e}. Offline, pass a local "
                                        "Mimi checkpoint (file or folder) as `mimi` (--mimi)") from e
        tok = tokenizer or self.ckpt.tokenizer_file
        if tok is None:
            raise FileNotFoundError(f"{checkpoint} has no tokenizer.json: pass the Llama-3 tokenizer.json "
                                    "(e.g. from meta-llama/Llama-3.2-1B) as `tokenizer`")
        self.tokenizer = Tokenizer(tok)

    @classmethod
    def from_parts(cls, cfg: CsmConfig, params: dict, mimi_params: dict, tokenizer: str,
                   quantize: str | None = None):
        """A bundle over parameters already in memory (random weights for benchmarks, fine-tuned ones)."""
        bundle = cls.__new__(cls)
        bundle.ckpt, bundle.cfg, bundle.params, bundle.mimi = None, cfg, quantize_csm(params, quantize), mimi_params
        bundle.tokenizer = Tokenizer(tokenizer)
        return bundle

    # ---------------------------------------------------------------------------------------- helpers

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        """24 kHz mono (L,) -> Mimi codes (32, ceil(L / 1920)). Lengths of whole frames compile once per
        power-of-two bucket; give whole frames (pad with silence) where many lengths come by."""
        audio = check_audio(audio, "context audio")
        if audio.size % FRAME_SAMPLES:  # a partial last frame: Mimi pads it its own way, so encode as it is
            return np.asarray(encode(self.mimi, jnp.asarray(audio[None])))[0]
        # Whole frames: padded to a bucketed length (few compilations); the encoder is causal, so the
        # trailing zeros leave the codes of the real frames exactly as they are.
        T = audio.size // FRAME_SAMPLES
        padded = np.zeros(bucket(T, 4) * FRAME_SAMPLES, np.float32)
        padded[:audio.size] = audio
        return np.asarray(encode(self.mimi, jnp.asarray(padded[None])))[0, :, :T]

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        """Mimi codes (32, T) -> 24 kHz audio (1920 T,)."""
        T = codes.shape[1]
        if T == 0:
            return np.zeros(0, np.float32)
        padded = np.zeros((32, bucket(T, 4)), np.int32)
        padded[:, :T] = codes  # causal decoder: trimming the padded tail gives exactly the unpadded audio
        return np.asarray(decode(self.mimi, jnp.asarray(padded[None])))[0, :T * FRAME_SAMPLES]

    def context_codes(self, context: Sequence[Segment]) -> list[Segment]:
        """The segments with any audio Mimi-encoded into codes (encode voice prompts once, reuse the result)."""
        out = []
        for seg in context:
            if seg.codes is None and seg.audio is not None:
                seg = Segment(seg.speaker, seg.text, None, self.encode_audio(seg.audio))
            out.append(seg)
        return out

    def prompt(self, context: Sequence[Segment], speaker: int, text: str, max_frames: int,
               drop_oldest: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The prompt rows (S, 33) of `text` after `context` (audio encoded here), leaving room for
        `max_frames` (csm_jax.text.build_prompt; raises ValueError when it cannot fit)."""
        tokens, mask, _ = build_prompt(self.tokenizer, self.context_codes(context), speaker, text, max_frames,
                                       self.cfg.max_seq_len, drop_oldest)
        return tokens, mask
