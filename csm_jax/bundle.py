"""The loaded model at the bottom of everything: CSM parameters and config, Mimi parameters, the tokenizer, and
the helpers every part shares (Mimi encode/decode of whole clips, context segments to codes, prompt rows).
The engine, the generator, dialogues and the server use it; it uses none of them.

    bundle = ModelBundle("sesame/csm-1b")          # or a local folder; dtype and int8 quantization at load
    codes = bundle.encode_audio(audio_24k)          # (32, frames)
    tokens, mask = bundle.prompt(context, speaker=0, text="Hello.", max_frames=125)

On several devices: `ModelBundle(..., mesh=csm_jax.sharding.make_mesh())` places the CSM parameters by the
rules of csm_jax.sharding (replicated, or split along "model") and Mimi's replicated on every device of the
mesh. The bundle then also places what runs on them (`new_state`, `new_mimi_state`, `put`): generation and Mimi
decoder state by their logical axes (sharding.STATE_AXES, STREAM_AXES: slots split along "data"), host values
replicated, so every program sees inputs on the same devices. Without a mesh everything stays on the default
device, as JAX puts it.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from csm_jax import sharding
from csm_jax.audio import FRAME_SAMPLES, SAMPLE_RATE, check_audio
from csm_jax.checkpoints import load_csm
from csm_jax.csm import CsmConfig, GenState
from csm_jax.mimi import decode, encode, init_decoder_state, load_mimi, mimi_params_from_tensors, reset_state_rows
from csm_jax.quantize import quantize_csm
from csm_jax.schedule import bucket
from csm_jax.text import Segment, Tokenizer, build_prompt

# Kept for the programs' temporaries when a device's slots are counted: a share of its memory, and at least
# the largest scratch csm-1b's programs need (prefill of 64 x 128 rows: 7.1 GB in fp32, bench_startup.py).
SLOT_HEADROOM = 0.1
MIN_HEADROOM = 8 * 2**30


def memory_device(mesh: Mesh | None):
    """The device whose memory figures stand for every device of `mesh` (the default device without one)."""
    return mesh.devices.flat[0] if mesh is not None else jax.devices()[0]


def memory_limits(device, stats: dict | None = None) -> tuple[int, int]:
    """(bytes JAX may use, bytes in use) of `device`, from its memory_stats() (or `stats`); ValueError when it
    reports none (CPUs don't)."""
    stats = device.memory_stats() if stats is None else stats
    if not stats or "bytes_limit" not in stats:
        raise ValueError(f"the device ({device.platform}) reports no memory figures (memory_stats), so the "
                         "slots that fit cannot be computed: give a number of slots")
    return stats["bytes_limit"], stats.get("bytes_in_use", 0)


class ModelBundle:
    """A loaded CSM + Mimi + tokenizer: parameters, config, and the audio and prompt helpers every part uses."""

    def __init__(self, checkpoint: str = "sesame/csm-1b", mimi: str | None = None, tokenizer: str | None = None,
                 dtype=None, quantize: str | None = None, mesh: Mesh | None = None):
        """`mesh` (csm_jax.sharding.make_mesh): run on its devices; None: the default device."""
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
        self._place(mesh)

    @classmethod
    def from_parts(cls, cfg: CsmConfig, params: dict, mimi_params: dict, tokenizer: str,
                   quantize: str | None = None, mesh: Mesh | None = None):
        """A bundle over parameters already in memory (random weights for benchmarks, fine-tuned ones)."""
        bundle = cls.__new__(cls)
        bundle.ckpt, bundle.cfg, bundle.params, bundle.mimi = None, cfg, quantize_csm(params, quantize), mimi_params
        bundle.tokenizer = Tokenizer(tokenizer)
        bundle._place(mesh)
        return bundle

    # ------------------------------------------------------------------------------------- placement

    def _place(self, mesh: Mesh | None) -> None:
        sharding.check_mesh(mesh)
        self.mesh = mesh
        # Programs compiled for this bundle's mesh, made on first use: ("state", slots) -> a GenState maker,
        # ("mimi_reset", slots) -> the row reset. Every state they return is placed as sharding's description says,
        # exactly as the engine's generation program returns it: a program's compiled form depends on its
        # inputs' shardings, and equivalent but unequal ones would compile the next program again while serving.
        self._programs: dict = {}
        if mesh is not None:
            self.params = sharding.shard_params(self.params, mesh)
            self.mimi = jax.device_put(self.mimi, sharding.replicated(mesh))
            if self.ckpt is not None:
                self.ckpt.params = self.params  # the one-device copy is not kept

    @property
    def data_size(self) -> int:
        """Devices along the mesh's "data" axis (1 without a mesh): slot counts are multiples of it."""
        return sharding.data_size(self.mesh)

    def round_slots(self, n: int) -> int:
        """`n` slots rounded up to a multiple of the "data" size (each device gets as many)."""
        return sharding.round_up(n, self.mesh)

    def check_slots(self, slots: int) -> None:
        """Raises unless `slots` slots split evenly over the mesh's "data" devices (sharding.check_split)."""
        sharding.check_split(slots, self.mesh)

    def slot_bytes(self) -> int:
        """Bytes one slot holds on its device: its generation state (KV cache for max_seq_len positions,
        position, sampling settings) and its streaming Mimi decoder state, from their shapes (on a mesh, the
        part its device holds: the cache's kv heads may be split along "model")."""
        dtype, n = self.params["text_embed"].dtype, self.data_size  # one slot per device
        gen = jax.eval_shape(lambda: GenState.create(self.cfg, n, dtype))
        mimi = jax.eval_shape(lambda: init_decoder_state(self.mimi, n))
        if self.mesh is None:
            shapes = [x.shape for x in jax.tree.leaves((gen, mimi))]
        else:
            placed = (sharding.state_shardings(gen, self.mesh), sharding.stream_shardings(mimi, self.mesh))
            shapes = [s.shard_shape(x.shape) for x, s in zip(jax.tree.leaves((gen, mimi)), jax.tree.leaves(placed))]
        return sum(int(np.prod(shape)) * x.dtype.itemsize for shape, x in zip(shapes, jax.tree.leaves((gen, mimi))))

    def slots_that_fit(self, stats: dict | None = None) -> tuple[int, str]:
        """The most slots a device's memory holds beside what it already holds (the parameters), keeping
        SLOT_HEADROOM of its memory (at least MIN_HEADROOM bytes) for the programs' temporaries: (slots, why in
        words). `stats`: the device's memory_stats() (default: the first device of the mesh, or the default
        one), which give "bytes_limit" and "bytes_in_use". A multiple of 8 per device, times the mesh's "data"
        size. ValueError when the device reports no memory (CPUs don't) or holds fewer than 8 slots."""
        device = memory_device(self.mesh)
        limit, used = memory_limits(device, stats)
        per = self.slot_bytes()
        kept = max(limit * SLOT_HEADROOM, MIN_HEADROOM)
        n = int((limit - kept - used) // per) // 8 * 8
        GiB = 2**30
        if n < 8:
            raise ValueError(f"the device's memory ({limit / GiB:.1f} GiB, {used / GiB:.1f} GiB in use) holds fewer "
                             f"than 8 slots of {per / 2**20:.0f} MiB with {kept / GiB:.1f} GiB kept for the "
                             "programs: give a number of slots, or use a device with more memory")
        why = (f"{limit / GiB:.1f} GiB of device memory for JAX, {used / GiB:.1f} GiB in use (the parameters), "
               f"{kept / GiB:.1f} GiB kept for the programs' temporaries, {per / 2**20:.1f} MiB per slot (cache of "
               f"{self.cfg.max_seq_len} positions and Mimi's decoder)")
        return n * self.data_size, why + (f", {n} on each of {self.data_size} devices" if self.data_size > 1 else "")

    def put(self, values, dtype) -> jax.Array:
        """Host values to the device(s) as `dtype`: a plain transfer (jnp.asarray would compile a conversion),
        replicated on every device of the mesh when there is one."""
        x = np.asarray(values, dtype)
        return jax.device_put(x) if self.mesh is None else jax.device_put(x, sharding.replicated(self.mesh))

    def replicate(self, x):
        """A device array (or pytree of them) on the default device -> replicated on the mesh (as is without)."""
        return x if self.mesh is None else jax.device_put(x, sharding.replicated(self.mesh))

    def new_state(self, slots: int) -> GenState:
        """A fresh generation state of `slots` slots (csm.GenState), split along "data" on a mesh: created in
        place on each device (never whole on one), so a mesh holds as many slots as its devices' memory."""
        dtype = self.params["text_embed"].dtype
        if self.mesh is None:
            return GenState.create(self.cfg, slots, dtype)
        self.check_slots(slots)
        if ("state", slots) not in self._programs:
            create = partial(GenState.create, self.cfg, slots, dtype)
            self._programs["state", slots] = jax.jit(
                create, out_shardings=sharding.state_shardings(jax.eval_shape(create), self.mesh))
        return self._programs["state", slots]()

    def new_mimi_state(self, slots: int):
        """A fresh streaming Mimi decoder state of `slots` streams, split along "data" on a mesh (every leaf has
        the stream axis first: sharding.STREAM_AXES)."""
        state = init_decoder_state(self.mimi, slots)
        if self.mesh is None:
            return state
        self.check_slots(slots)
        state = jax.device_put(state, sharding.stream_shardings(state, self.mesh))
        # Through the (compiled) row reset once, resetting nothing: its empty leaves then come out replicated, as
        # every later program returns them, rather than split as device_put leaves them.
        return self.reset_mimi_rows(state, self.put(np.zeros(slots), bool),
                                    self.replicate(init_decoder_state(self.mimi, 1)))

    def reset_mimi_rows(self, state, rows, fresh):
        """mimi.reset_state_rows (rows (B,) bool start afresh; `state` is donated), by `mimi_reset_program`."""
        return self.mimi_reset_program(state)(state, rows, fresh)

    def mimi_reset_program(self, state):
        """The jitted row reset of Mimi decoder states shaped as `state`: mimi.reset_state_rows, or on a mesh
        the same mapped over "data" (each device resets its own streams) with its result placed like
        `new_mimi_state`'s (left to itself, XLA may replicate some leaves, and the next program would compile
        again for them)."""
        if self.mesh is None:
            return reset_state_rows
        slots = state["offset"].shape[0]
        if ("mimi_reset", slots) not in self._programs:
            streams = sharding.specs(sharding.stream_shardings(state, self.mesh))
            self._programs["mimi_reset", slots] = jax.jit(jax.shard_map(
                reset_state_rows, mesh=self.mesh, in_specs=(streams, sharding.slot_spec(slots, self.mesh),
                                                            PartitionSpec()),
                out_specs=streams, check_vma=False), donate_argnums=(0,))
        return self._programs["mimi_reset", slots]

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

    def warm_encoder(self, max_seconds: float, progress=None) -> int:
        """Compiles the Mimi encoder for every whole-frame length bucket up to `max_seconds` of audio (what
        `encode_audio` runs for recordings padded to whole frames, such as conversation turns), so no such
        recording compiles while serving. Returns the number of buckets."""
        top = bucket(max(1, int(np.ceil(max_seconds * SAMPLE_RATE / FRAME_SAMPLES))), 4)
        T, n = 4, 0
        while T <= top:
            self.encode_audio(np.zeros(T * FRAME_SAMPLES, np.float32))
            n += 1
            if progress is not None:
                progress(f"Mimi encoder for {T} frames ({T * FRAME_SAMPLES / SAMPLE_RATE:g} s)")
            T *= 2
        return n

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
