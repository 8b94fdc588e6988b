"""Start-up: the programs an engine compiles (few), what each needs in memory beside the state it updates in
place, and the slots a device's memory holds.

Memory is XLA's own account of each compiled program (`memory_analysis()`), compiled from shapes alone (no
state of that size is made, nothing runs) at two slot counts: a program that copied the generation state's
cache or the Mimi decoder state (or held both an old and a new version of it) would need scratch growing with
every slot's whole state; one that updates them in place needs only its rows' activations."""

import jax
import numpy as np
import pytest

from csm_jax import csm
from csm_jax.bundle import ModelBundle
from csm_jax.mimi import init_decoder_state
from csm_jax.programs import Programs, split_counts

F = 4


@pytest.fixture(scope="module")
def model(csm_dir):
    return ModelBundle(str(csm_dir))


def _shapes(model, slots):
    dtype = model.params["text_embed"].dtype
    return (jax.eval_shape(lambda: csm.GenState.create(model.cfg, slots, dtype)),
            jax.eval_shape(lambda: init_decoder_state(model.mimi, slots)))


def test_few_programs_at_full_size(model, csm_dir):
    """csm-1b at 1,024 slots: 5 generation programs (1, 8, 64, 256 and every slot), prefill for groups of 64, 8
    and 1 requests at 4 piece sizes, 5 slot updates: 22 programs (powers of two compiled 11 + 16 + 16 = 43)."""
    cfg = csm.CsmConfig.csm_1b()
    params = jax.eval_shape(lambda: csm.init_params(cfg, jax.random.key(0)))
    big = ModelBundle.from_parts(cfg, params, model.mimi, str(csm_dir / "tokenizer.json"))
    programs = Programs(big, 1024, F)
    names = [p.what for p in programs.table(*_shapes(big, 1024))]
    assert names == ([f"generate {F} frames for {r} slots" for r in (1, 8, 64, 256, 1024)]
                     + [f"prefill {c} x {p} rows" for c in (64, 8, 1) for p in (32, 64, 96, 128)]
                     + ["reset slots", "start slots", "reset Mimi streams", "stop slots", "rewind slots"])
    # Rows of a generation step by generating slots; requests of a prefill split into groups, none padded.
    assert [programs.rows(n) for n in (1, 2, 8, 9, 64, 65, 256, 257, 1024)] == [1, 8, 8, 64, 64, 256, 256, 1024,
                                                                              1024]
    assert split_counts(137, programs.counts) == [64, 64, 8, 1] and split_counts(7, programs.counts) == [1] * 7
    assert Programs(big, 300, F).generate_rows() == [1, 8, 64, 256, 300]


@pytest.mark.slow
def test_no_program_copies_the_state(model):
    """Each serving program compiled at 16 and at 32 slots (the tiny model: a slot's cache is 4.2 MB, its Mimi
    decoder state 8.4 MB): the scratch (temp) grows by less than half of the 16 added slots' cache, where a
    second copy of the cache or of the Mimi state would add at least all of it (the streaming Mimi decoder
    once held a second copy of its state in scratch at every step); and every program returns exactly its own
    results beside the state it updates in place (outputs aliased to the donated inputs): XLA counts beside them
    only the table of the program's output buffers, 8 bytes an output array."""
    slot_cache = 2 * 2 * (2 * 2048 * 64) * 4  # tiny backbone: 2 layers x (k, v) x (2 kv heads x 2048 x 64) fp32
    analysis = {}
    for slots in (16, 32):
        table = Programs(model, slots, F).table(*_shapes(model, slots))
        for p in table:
            if p.what in (f"generate {F} frames for 8 slots",) or p.what.startswith("prefill") and p.what not in (
                    "prefill 8 x 128 rows", "prefill 1 x 32 rows"):
                continue  # one generation of a subset of the slots, the largest and the smallest prefill
            kind = "generate every slot" if p.what == f"generate {F} frames for {slots} slots" else p.what
            compiled = p.fn.lower(*p.args).compile()
            analysis.setdefault(kind, {})[slots] = (compiled.memory_analysis(), len(jax.tree.leaves(compiled.out_info)))
    assert len(analysis) == 9 and all(len(by_slots) == 2 for by_slots in analysis.values()), list(analysis)
    for kind, by_slots in analysis.items():
        grown = by_slots[32][0].temp_size_in_bytes - by_slots[16][0].temp_size_in_bytes
        assert grown < 16 * slot_cache / 2, f"{kind}: scratch grew {grown / 1e6:.1f} MB from 16 to 32 slots"
        for slots, (m, outputs) in by_slots.items():
            rows = slots if kind == "generate every slot" else int(kind.split()[-2]) if "generate" in kind else 0
            # A generation step's results: pcm (R, F x 1920) fp32 and as int16, codes (R, F, 32) int32, valid
            # (R, F) and done (R,) bool; every other output is a donated input's buffer.
            results = rows * F * (1920 * 4 + 1920 * 2 + 32 * 4 + 1) + rows
            new = m.output_size_in_bytes - m.alias_size_in_bytes
            assert new == results + 8 * outputs, (kind, slots, new, results, outputs)


def test_slots_that_fit_the_device_memory(model):
    """The rule: (memory limit - what is kept for the programs - bytes in use) // bytes per slot, rounded down
    to a multiple of 8; kept: 10% of the limit, at least 8 GiB. A slot of the tiny model, worked out by hand
    from the shapes: its generation state (cache k and v, 2 layers x 2 kv heads x 2048 positions x 64, fp32;
    the cache's positions; h of 512; 29 bytes of position, done, frame count and cap, temperature, top-k and
    PRNG key) and its Mimi decoder state (8 layers' rings: k and v 8 heads x 256 cells x 64 fp32 and 256
    positions; SEANet's convolution histories, 11,648 floats; the upsample's 2 x 512; offset and first)."""
    gen = 2 * 2 * (2 * 2048 * 64) * 4 + 2048 * 4 + 512 * 4 + 29
    mimi = 8 * (2 * 8 * 256 * 64 * 4 + 256 * 4) + 11_648 * 4 + 2 * 512 * 4 + 4 + 1
    per = gen + mimi
    assert model.slot_bytes() == per and np.isclose(per / 2**20, 12.07, atol=0.01)
    GiB = 2**30
    slots, why = model.slots_that_fit({"bytes_limit": 100 * GiB, "bytes_in_use": GiB})  # keeps 10 GiB
    assert slots == int((89 * GiB) // per) // 8 * 8 == 7552
    assert "100.0 GiB" in why and "10.0 GiB kept" in why and "12.1 MiB per slot" in why
    slots, why = model.slots_that_fit({"bytes_limit": 10 * GiB, "bytes_in_use": GiB})  # keeps 8 GiB
    assert slots == int(GiB // per) // 8 * 8 == 80 and "8.0 GiB kept" in why
    with pytest.raises(ValueError, match="fewer than 8 slots"):
        model.slots_that_fit({"bytes_limit": 8 * GiB + 50 * 2**20, "bytes_in_use": 0})  # 50 MiB: 4 slots
    if not jax.devices()[0].memory_stats():  # a CPU: no figures to count from
        with pytest.raises(ValueError, match="reports no memory figures"):
            model.slots_that_fit()
