"""The LLM: an OpenAI-compatible /chat/completions client with streamed text (Ollama, llama.cpp, vLLM, OpenAI).
Its reply is cut into sentences by csm_jax.text.SentenceCutter, each spoken while the LLM writes the next."""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Iterator

SYSTEM_PROMPT = ("You are a friendly voice assistant in a spoken conversation. Answer in one to three short "
                 "sentences of plain spoken English: no lists, no markdown, no emoji, no stage directions.")


class LLMError(RuntimeError):
    """The LLM endpoint failed; the message says how (and the conversation goes on)."""


class ChatClient:
    """An OpenAI-compatible chat-completions client with streamed text.

    base_url: e.g. http://localhost:11434/v1 (Ollama), http://localhost:8080/v1 (llama.cpp server),
    https://api.openai.com/v1. The API key is read from the environment variable `api_key_env`."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 system_prompt: str = SYSTEM_PROMPT, max_tokens: int = 200, temperature: float = 0.7,
                 timeout_s: float = 30.0):
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.system_prompt = model, system_prompt
        self.max_tokens, self.temperature, self.timeout_s = max_tokens, temperature, timeout_s
        key = os.environ.get(api_key_env, "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)))

    def stream(self, messages: list[dict], stop: threading.Event | None = None) -> Iterator[str]:
        """Text deltas of the reply to `messages` (a list of {"role", "content"}), as they arrive."""
        import httpx

        body = {"model": self.model, "stream": True, "max_tokens": self.max_tokens,
                "temperature": self.temperature,
                "messages": [{"role": "system", "content": self.system_prompt}, *messages]}
        try:
            with self.http.stream("POST", self.url, json=body, headers=self.headers) as r:
                if r.status_code >= 400:
                    detail = r.read().decode(errors="replace")[:300]
                    raise LLMError(f"the LLM at {self.url} answered {r.status_code}: {detail}")
                for line in r.iter_lines():
                    if stop is not None and stop.is_set():
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        msg = json.loads(data)
                    except ValueError as e:
                        raise LLMError(f"the LLM at {self.url} sent a malformed stream line: {data[:120]}") from e
                    if "error" in msg:
                        raise LLMError(f"the LLM at {self.url} failed: {msg['error']}")
                    for choice in msg.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
        except httpx.ConnectError as e:
            raise LLMError(f"cannot reach the LLM at {self.url} ({e}); start it or pass the right --llm-url") from e
        except httpx.TimeoutException as e:
            raise LLMError(f"the LLM at {self.url} did not answer within {self.timeout_s:g} s; "
                           "it may be overloaded or loading a model: try again, or raise --llm-timeout") from e
        except httpx.HTTPError as e:
            raise LLMError(f"the connection to the LLM at {self.url} failed: {e}") from e


_MARKDOWN = re.compile(r"[*_`#>]+")


def without_markdown(text: str) -> str:
    """`text` without markdown's marks (* _ ` # >), which a voice would read out; a stream's pieces can be
    cleaned one by one, as it deletes single characters."""
    return _MARKDOWN.sub("", text)
