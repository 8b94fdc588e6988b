"""benchmarks/bench_host.py: its quick mode runs the real engine, driver and server on a stubbed device and
reports every part, with every byte the server sent checked; its check catches wrong bytes; its device cost
model gives the hand-computed step times. And the 16-bit PCM conversion the server's bytes come from
(audio.pcm16, on the host and compiled as the generation program runs it) is the server's formula exactly.
Speed figures are not checked: speed is the benchmark's business."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from csm_jax.audio import pcm16

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_host  # noqa: E402


def test_quick_mode_reports_every_part_and_the_bytes_are_exact():
    out = subprocess.run([sys.executable, "benchmarks/bench_host.py", "--quick"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["bench"] == "host" and result["frames_per_call"] == 4 and result["send_us_per_chunk"] > 0
    [row] = result["rows"]
    assert row["slots"] == 8
    for key in ("engine_us_per_slot", "send_us_per_slot", "host_ms_per_step", "device_ms_per_step"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert math.isfinite(row["fan_out_us_per_slot"])  # the server's run minus the engine's: noise may win
    assert row["device_ms_per_step"] == 50.8  # 4 x (10.577 + 2.129) ms at 8 rows, by hand from the H100 table
    assert abs(row["host_share_of_step"] - row["host_ms_per_step"] / row["device_ms_per_step"]) < 2e-3
    # 8 streams, each at least the 3 measured steps' chunks after its first, every one its own slot's PCM.
    assert row["pcm16_exact"] is True and row["problems"] == [] and row["chunks_checked"] >= 8 * 4, row
    table = next(i for i, line in enumerate(lines) if line.split()[:1] == ["slots"])
    assert lines[table + 1].split()[0] == "8" and lines[table + 1].rstrip().endswith("pcm16 exact: True")


def test_the_byte_check_catches_wrong_bytes():
    """Streams made by hand from a stub's PCM rows: right ones pass; a rounded (not truncated) conversion, two
    streams of one slot, a stream cut inside a chunk and a stream without its WAV header each fail."""
    args = bench_host.Args(frames_per_call=1)
    rng = np.random.default_rng(1)
    pcm = rng.uniform(-1.2, 1.2, (3, 1920)).astype(np.float32)
    truncated = [(np.clip(row, -1, 1) * 32767).astype("<i2").tobytes() for row in pcm]
    rounded = [np.round(np.clip(row, -1, 1) * 32767).astype("<i2").tobytes() for row in pcm]
    assert truncated[0] != rounded[0]
    header = b"RIFF" + bytes(40)

    def check(streams):
        return bench_host.check_bytes(streams, pcm, args)

    good = check([[header, truncated[0], truncated[0]], [header, truncated[2]]])
    assert good == {"pcm16_exact": True, "chunks_checked": 3, "problems": []}
    assert not check([[header, truncated[0]], [header, rounded[2]]])["pcm16_exact"]
    assert not check([[header, truncated[1]], [header, truncated[1]]])["pcm16_exact"]
    assert not check([[header, truncated[0], truncated[0][:100]]])["pcm16_exact"]
    assert not check([[truncated[0]]])["pcm16_exact"]
    assert not check([[header], [header]])["pcm16_exact"]  # nothing to check is no pass


def test_device_step_model_by_hand():
    """F x (a frame of generation + a Mimi decode step), linear in rows between the H100's points and beyond the
    last by the last two's slope: at 256 rows 4 x (18.40 + 8.4); at 640 the frame is 23.33 + 4.93 x 128 / 256
    and Mimi 8.4 + 4.2 x 384 / 192; at 1 row 10.47 + 1.87."""
    assert math.isclose(bench_host.device_step_s(256, 4), 4 * (18.40 + 8.4) / 1e3)
    assert math.isclose(bench_host.device_step_s(640, 4), 4 * (25.795 + 16.8) / 1e3)
    assert math.isclose(bench_host.device_step_s(1, 8), 8 * (10.47 + 1.87) / 1e3)


def test_pcm16_is_the_servers_formula_exactly():
    """audio.pcm16, in NumPy and compiled with JAX, against the formula the server has always used, written out
    here: random samples mostly out of [-1, 1], each side of every 1/32767 step where truncation flips, exactly
    +-1, -0.0, tiny values, +-inf and NaN (0, as NumPy casts it on this machine and XLA defines it)."""
    rng = np.random.default_rng(0)
    steps = np.arange(-32767, 32768, dtype=np.float64) / 32767
    x = np.concatenate([rng.uniform(-3, 3, 200_000), steps, np.nextafter(steps, 2), np.nextafter(steps, -2),
                        [1.0, -1.0, -0.0, 0.0, 1e-30, -1e-30, np.inf, -np.inf, np.nan, np.nan]]).astype(np.float32)
    x = x[rng.permutation(len(x))]  # NaN and the edges at every alignment of the vector loops
    with np.errstate(invalid="ignore"):  # NumPy warns when it casts NaN
        want = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
        assert pcm16(x).tobytes() == want
    got = np.asarray(jax.jit(pcm16)(x))
    assert got.dtype == np.int16 and got.tobytes() == want
    assert got[np.isnan(x)].tolist() == [0, 0] and got[x == np.inf].tolist() == [32767]
