"""Conversations with real parts: espeak-ng turns, silero-vad, faster-whisper tiny.en, an OpenAI-compatible
LLM server process, and a tiny random CSM; the CSM context is appended turn by turn."""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from converse_fixtures import speak
from csm_jax.converse import (ChatClient, Conversation, LiveSession, SentenceCutter, Transcriber, TurnDetector,
                              VoiceActivity, without_markdown)
from csm_jax.dialogue import Dialogue, codes_digest
from csm_jax.generate import Generator
from csm_jax.text import Segment
from llm_fixtures import REPLY

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["Hello there.", "How are you today?"]


@pytest.fixture(scope="module")
def gen(csm_dir):
    return Generator(str(csm_dir), frames_per_call=4)


@pytest.fixture
def one_slot(gen):
    """Makes drivers of one slot, each with its thread stepping the engine; closed after the test."""
    made = []

    def make():
        made.append(gen.driver(1).start_thread())
        return made[-1]

    yield make
    for driver in made:
        driver.close()


@pytest.fixture(scope="module")
def turns(tmp_path_factory):
    d = tmp_path_factory.mktemp("turns")
    return [speak("What is the weather like on Mars today?", d / "turn1.wav", 1.0),
            speak("Please tell me a short story about a robot.", d / "turn2.wav", 1.0)]


def test_sentence_cutter():
    """The LLM's stream as the conversation cuts it: markdown marks out, then sentences as they complete."""
    c = SentenceCutter(max_chars=40)
    out = []
    for delta in ["Hel", "lo there", ". How", " are you", "?", " I'm *fine*", ", thanks!\n\nA", " list"]:
        out += c.feed(without_markdown(delta))
    assert out == ["Hello there.", "How are you?", "I'm fine, thanks!"]
    assert c.flush() == ["A list"]
    c = SentenceCutter()  # marks go before the cutting, so "**Sure.**" ends a sentence; a rule has no words
    assert c.feed(without_markdown("**Sure.** Here\n\n---\n\nit is. ")) == ["Sure.", "Here", "it is."]
    c = SentenceCutter(max_chars=20)
    assert c.feed("one two three four five six seven eight") == ["one two three four"]  # cut at a space
    assert c.flush() == ["five six seven eight"] and SentenceCutter().flush() == []
    assert SentenceCutter().feed("Dr. Smith arrived. ") == ["Dr.", "Smith arrived."]  # no abbreviation magic


@pytest.mark.slow
def test_headless_script_end_to_end(csm_dir, llm_server, asr_model, turns, tmp_path):
    silent = tmp_path / "silence.wav"
    sf.write(str(silent), np.zeros(24000, np.float32), 24000)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "converse.py"), "--input", str(turns[0]), "--input", str(silent),
           "--input", str(turns[1]), "--out-dir", str(out), "--checkpoint", str(csm_dir),
           "--llm-url", llm_server.url, "--llm-model", llm_server.model, "--asr-model", asr_model,
           "--max-sentence-ms", "400", "--seed", "3", "--dtype", "float32"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "silence.wav: no speech found" in r.stderr
    logs = [json.loads(line) for line in (out / "transcript.jsonl").read_text().splitlines()]
    assert [log["turn"] for log in logs] == [1, 2]
    assert "weather" in logs[0]["user_text"].lower() and "mars" in logs[0]["user_text"].lower()
    assert "robot" in logs[1]["user_text"].lower()
    for log in logs:
        assert log["reply_text"] == REPLY and log["sentences"] == SENTENCES and not log["error"]
        audio, sr = sf.read(str(out / f"reply_{log['turn']:03d}.wav"))
        assert sr == 24000 and abs(audio.size / sr - log["audio_seconds"]) < 1e-3 and 0 < log["audio_seconds"] <= 0.8
        assert {"asr_s", "context_s", "llm_first_sentence_s", "first_audio_s", "total_s"} <= set(log["latency"])
        assert not log["rebuilt"] and log["appended_rows"] == log["context_rows"] - log["context_rows_before"]
    # Turn 2 was spoken in a context holding turn 1's user audio codes and both reply sentences' codes,
    # appended after turn 1's rows (the cache went on from where turn 1 left it: not rebuilt).
    first, second = logs
    assert second["context_rows_before"] == first["context_rows"]
    ctx = second["context"]
    assert [(c["speaker"], c["text"]) for c in ctx] == [(0, first["user_text"]), (1, SENTENCES[0]),
                                                         (1, SENTENCES[1]), (0, second["user_text"])]
    assert ctx[0]["codes_sha1"] == first["user_codes_sha1"] and ctx[0]["frames"] == first["user_frames"] > 10
    assert all(c["frames"] > 0 for c in ctx[1:3])
    assert sum(c["rows"] for c in ctx[:3]) == first["context_rows"]  # exactly what turn 1 left in the cache


def stalled_endpoint():
    """A port that accepts connections and never answers (an overloaded LLM server)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s, f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


@pytest.mark.slow
def test_llm_down_or_slow_then_retry(gen, one_slot, llm_server):
    d = Dialogue(one_slot())
    llm = ChatClient(closed_port_url(), llm_server.model, timeout_s=2)
    conv = Conversation(d, llm, max_sentence_ms=240)
    log = conv.respond("Are you there?")
    assert log.error and "cannot reach the LLM" in log.error and log.reply_text == "" and log.audio_seconds == 0
    assert conv.messages == []  # a failed turn leaves no half exchange in the LLM's messages

    stalled, url = stalled_endpoint()
    try:
        llm.url = url + "/chat/completions"
        log = conv.respond("Hello?")
        assert log.error and "did not answer within 2 s" in log.error
    finally:
        stalled.close()

    llm.url = llm_server.url + "/chat/completions"  # the server is back: the same conversation goes on
    log = conv.respond("Now?")
    assert log.error is None and log.reply_text == REPLY and log.audio_seconds > 0
    assert conv.messages == [{"role": "user", "content": "Now?"}, {"role": "assistant", "content": REPLY}]
    assert [s.text for s in d.segments] == ["Are you there?", "Hello?", "Now?", *SENTENCES]


@pytest.mark.slow
def test_asr_hears_nothing_is_no_turn(gen, one_slot, llm_server, asr_model):
    d = Dialogue(one_slot())
    conv = Conversation(d, ChatClient(llm_server.url, llm_server.model), Transcriber(asr_model))
    noise = (0.003 * np.random.default_rng(0).standard_normal(16000 * 2)).astype(np.float32)
    assert conv.turn(noise, 16000) is None
    assert d.rows == 0 and conv.messages == [] and conv.turns == 0


@pytest.mark.slow
def test_user_audio_codes_in_context_and_long_turn(gen, one_slot, llm_server, asr_model, turns):
    rng = np.random.default_rng(0)
    voice = [Segment(1, "I am the assistant.", codes=rng.integers(0, 2048, (32, 60)).astype(np.int32))]
    d = Dialogue(one_slot(), voice)
    conv = Conversation(d, ChatClient(llm_server.url, llm_server.model), Transcriber(asr_model),
                        max_sentence_ms=320)
    audio, sr = sf.read(str(turns[0]), dtype="float32")
    log = conv.turn(audio, sr)
    import jax.numpy as jnp

    from csm_jax.audio import resample
    from csm_jax.mimi import encode

    user = d.segments[1]
    a24 = resample(audio, sr, 24000)
    a24 = np.pad(a24, (0, -a24.size % 1920))  # the turn is closed with silence to a whole Mimi frame
    np.testing.assert_array_equal(user.codes, np.asarray(encode(gen.model.mimi, jnp.asarray(a24[None])))[0])
    assert log.user_codes_sha1 == codes_digest(user.codes) and "mars" in log.user_text.lower()

    # Old turns fill the cache; a long turn (70 s of audio) makes the oldest leave; the voice stays; it answers.
    for i in range(2):
        d.add(Segment(0, f"Old turn {i}.", codes=rng.integers(0, 2048, (32, 500)).astype(np.int32)))
    long_audio = np.tile(a24, 24)[: 24000 * 70]
    log = conv.respond("A very long story.", long_audio)
    assert log.rebuilt and log.dropped_segments >= 2 and log.reply_text == REPLY and log.audio_seconds > 0
    assert d.segments[0].text == "I am the assistant." and d.rows <= d.capacity
    assert d.segments[-3].text == "A very long story." and d.segments[-3].codes.shape[1] == 875


@pytest.mark.slow
def test_barge_in_stops_the_reply_and_takes_the_new_turn(gen, one_slot, llm_server, asr_model, turns):
    d = Dialogue(one_slot())
    conv = Conversation(d, ChatClient(llm_server.url, llm_server.model), Transcriber(asr_model),
                        max_sentence_ms=8000)
    a1, sr = sf.read(str(turns[0]), dtype="float32")
    a2, _ = sf.read(str(turns[1]), dtype="float32")
    events, first_audio, done = [], threading.Event(), threading.Event()

    def emit(kind, value):
        events.append((kind, value))
        if kind == "audio":
            first_audio.set()
        if kind == "turn" and value.turn == 2:
            done.set()

    session = LiveSession(conv, TurnDetector(VoiceActivity(), sr), emit)
    try:
        session.feed(a1)
        assert first_audio.wait(300)  # the reply to turn 1 is being spoken...
        session.feed(a2)  # ...when the user speaks again
        assert done.wait(300)
    finally:
        session.close()
    kinds = [k for k, _ in events]
    assert "barge_in" in kinds
    logs = [v for k, v in events if k == "turn"]
    assert logs[0].interrupted and logs[0].audio_seconds < 8.0 * len(SENTENCES)
    assert "robot" in logs[1].user_text.lower() and not logs[1].interrupted
    assert kinds.index("barge_in") < kinds.index("turn")  # the barge-in ended turn 1's reply


@pytest.mark.parametrize("extra, message", [
    (["--input", "missing.wav"], "input not found: missing.wav"),
    (["--input", "{wav}", "--voice", "{wav}"], "--voice needs --voice-text"),
    (["--input", "{wav}", "--out-dir", "/nonexistent/dir/out"], "output folder does not exist"),
    (["--input", "{wav}", "--out-dir", "{wav}"], "is a file: give a folder"),
    (["--input", "{wav}", "--temperature", "-1"], "error: --temperature -1.0: temperature must be"),
    (["--input", "{wav}", "--topk", "0"], "error: --topk 0: topk must be"),
    (["--input", "{wav}", "--vad-threshold", "1.5"], "error: --vad-threshold 1.5: give a speech probability"),
    (["--input", "{wav}", "--llm-timeout", "0"], "error: --llm-timeout 0.0: give a number above 0"),
])
def test_script_bad_arguments(csm_dir, turns, extra, message):
    extra = [a.format(wav=turns[0]) for a in extra]
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "converse.py"), "--checkpoint", str(csm_dir), *extra],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_a_part_that_is_missing_fails_the_start_before_the_warm_up_and_leaves_no_folder(csm_dir, tmp_path):
    from csm_jax.testing.inputs import speech_like

    wav = tmp_path / "turn.wav"
    sf.write(wav, speech_like(24000, seed=5), 24000)
    missing = str(tmp_path / "no-asr-model")
    out = tmp_path / "replies"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "converse.py"), "--checkpoint", str(csm_dir),
                        "--input", str(wav), "--out-dir", str(out), "--asr-model", missing],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and f"ASR model folder not found: {missing}" in r.stderr, r.stderr[-2000:]
    assert not out.exists()
    empty = tmp_path / "empty-asr"  # a folder without a model: one line, not CTranslate2's traceback
    empty.mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "converse.py"), "--checkpoint", str(csm_dir),
                        "--input", str(wav), "--out-dir", str(out), "--asr-model", str(empty)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot load the speech recognizer from {empty} (give a folder holding a CTranslate2"), r.stderr[-2000:]
    assert not out.exists()
    # The server's conversations: found before the Mimi encoder's warm-up (minutes for csm-1b), not after it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve.py"), "--checkpoint", str(csm_dir), "--port",
                        str(port), "converse", "--asr-model", missing], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "ASR model folder not found" in r.stderr, r.stderr[-2000:]
    assert "Mimi encoder" not in r.stderr, r.stderr[-2000:]


ASOUNDRC = """
pcm.!default {{ type asym playback.pcm "speaker" capture.pcm "microphone" }}
pcm.microphone {{ type file slave.pcm "silent" file "/dev/null" infile "{mic}" format "raw" }}
pcm.speaker {{ type file slave.pcm "silent" file "{speaker}" format "raw" }}
pcm.silent {{ type null }}
"""


@pytest.mark.slow
def test_microphone_mode_through_alsa(csm_dir, llm_server, asr_model, turns, tmp_path):
    """Microphone mode as a user runs it, with ALSA's file plugin as the sound card: the microphone reads a
    recording (float32, 16 kHz), the speaker writes into a pipe this test reads."""
    import signal

    from converse_fixtures import require
    from csm_jax.audio import resample

    try:
        import sounddevice  # noqa: F401  (needs the PortAudio library)
        ok = Path("/usr/share/alsa/alsa.conf").is_file()
    except (ImportError, OSError):
        ok = False
    require("sounddevice with PortAudio and ALSA", ok, "pip install sounddevice; apt-get install libportaudio2")
    audio, sr = sf.read(str(turns[0]), dtype="float32")
    mic = tmp_path / "mic.raw"
    np.concatenate([resample(audio, sr, 16000), np.zeros(16000 * 5, np.float32)]).astype("<f4").tofile(mic)
    speaker = tmp_path / "speaker.fifo"
    os.mkfifo(speaker)
    conf = tmp_path / "asoundrc"
    conf.write_text(ASOUNDRC.format(mic=mic, speaker=speaker))
    heard = {"nonzero": 0}

    def listen():  # the null device has no clock: playback runs as fast as it is read
        with open(speaker, "rb") as f:
            while chunk := f.read(1 << 16):
                heard["nonzero"] += int(np.count_nonzero(np.frombuffer(chunk[: len(chunk) // 4 * 4], "<f4")))

    reader = threading.Thread(target=listen, daemon=True)
    reader.start()
    env = dict(os.environ, ALSA_CONFIG_PATH=f"/usr/share/alsa/alsa.conf:{conf}", PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "converse.py"), "--checkpoint", str(csm_dir),
                             "--llm-url", llm_server.url, "--llm-model", llm_server.model, "--asr-model", asr_model,
                             "--max-sentence-ms", "400"], stderr=subprocess.PIPE, text=True, env=env,
                            # Ctrl-C as in a terminal, even where this runs in the background (SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines, turn_done = [], threading.Event()

    def read_stderr():  # read to the end: a full pipe would block the script
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("turn 1:"):
                turn_done.set()
        turn_done.set()

    stderr_reader = threading.Thread(target=read_stderr, daemon=True)
    stderr_reader.start()
    try:
        turn_done.wait(600)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:  # show where it hangs: faulthandler prints every thread's stack
            proc.send_signal(signal.SIGABRT)
            proc.wait(30)
    finally:
        proc.kill()
        stderr_reader.join(10)
    text = "".join(lines)
    assert proc.returncode == 0, text[-6000:]
    assert "listening" in text and "weather" in text.lower() and f"csm: {SENTENCES[0]}" in text, text[-3000:]
    # ALSA's null device has no clock: the recording arrives far faster than real time, and what the turn
    # detector cannot take is dropped with a warning instead of piling up in memory.
    assert "faster than real time" in text, text[-3000:]
    reader.join(10)
    assert heard["nonzero"] > 1920  # the reply reached the speaker


@pytest.mark.slow
def test_chat_history_is_bounded_and_speakers_differ(gen, one_slot, llm_server):
    conv = Conversation(Dialogue(one_slot()), ChatClient(llm_server.url, llm_server.model), max_sentence_ms=160,
                        max_messages=2)
    conv.respond("First question?")
    conv.respond("Second question?")
    assert conv.messages == [{"role": "user", "content": "Second question?"},
                            {"role": "assistant", "content": REPLY}]
    with pytest.raises(ValueError, match="different CSM speaker ids"):
        Conversation(Dialogue(one_slot()), conv.llm, user_speaker=1, reply_speaker=1)
