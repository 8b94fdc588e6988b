"""Talk to CSM: speech in -> voice activity -> speech recognition -> any LLM -> CSM speech out.

    with gen.driver(1) as driver:                           # a thread steps the engine (csm_jax.driver)
        conv = Conversation(Dialogue(driver, voice), ChatClient("http://localhost:11434/v1", "llama3.2"),
                            Transcriber("tiny.en"))
        log = conv.turn(user_audio, 16000, on_audio=play)  # one user turn -> the spoken reply, streamed

Each user turn goes into CSM's context as speaker 0 with its own audio (Mimi codes) and transcript, and
each spoken reply sentence as speaker 1 with the codes CSM made, so the reply's prosody follows the
dialogue; the context lives in the KV cache and is only appended to (csm_jax.dialogue). The LLM's reply
is streamed and cut at sentence ends; each sentence is spoken while the LLM writes the next one.

Parts, one file each, each usable alone:
  vad.py      VoiceActivity: silero-vad's ONNX model (the `silero_vad` package's bundled file) on onnxruntime;
              TurnDetector: streaming end-of-turn detection over it (speech start, then enough silence)
  asr.py      Transcriber: faster-whisper (a model name such as "tiny.en", or a local CTranslate2 folder)
  llm.py      ChatClient: OpenAI-compatible /chat/completions with streamed text (Ollama, llama.cpp, vLLM,
              OpenAI), cut into sentences by csm_jax.text.SentenceCutter (split_sentences' rule, incremental)
  session.py  Conversation (one turn: ASR -> LLM -> CSM), LiveSession (a microphone stream, barge-in), TurnLog
  options.py  ConverseOptions: the settings the scripts share, and a factory of conversations
"""

from csm_jax.converse.asr import Transcriber
from csm_jax.converse.llm import SYSTEM_PROMPT, ChatClient, LLMError, without_markdown
from csm_jax.converse.options import ConverseOptions, Serialized
from csm_jax.converse.session import Conversation, LiveSession, TurnLog
from csm_jax.converse.vad import VAD_RATE, TurnDetector, TurnEvent, VoiceActivity, default_vad_model
from csm_jax.text import SentenceCutter

__all__ = ["VAD_RATE", "SYSTEM_PROMPT", "VoiceActivity", "TurnEvent", "TurnDetector", "default_vad_model",
           "Transcriber", "ChatClient", "LLMError", "without_markdown", "SentenceCutter", "Conversation",
           "LiveSession", "TurnLog", "Serialized", "ConverseOptions"]
