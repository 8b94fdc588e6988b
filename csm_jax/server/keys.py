"""API keys: every request but the open routes (/health, the /converse page, /metrics when it is open) must
carry one of the server's keys as `Authorization: Bearer KEY`, as OpenAI's clients send it. Without one the
answer is 401 in OpenAI's error shape (code "invalid_api_key") with `WWW-Authenticate: Bearer`; the connection
stays open. No key: every route is open.

The conversation WebSocket takes the key in its handshake, so a refused socket gets 401 before the upgrade and
never holds a conversation place: in `Authorization: Bearer KEY` (programs), or, from a browser (whose
WebSocket cannot send headers), as the offered subprotocol `csm-jax.key.<KEY in unpadded base64url>` beside
`csm-jax`, which the server selects: the key never travels in a URL, which access logs and proxies record.

A key is compared as its SHA-256 digest with every configured key's (hmac.compare_digest, all of them, no early
exit), so neither the time taken nor the order tells which key matched or how much of one did. Keys are never
logged or echoed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Iterable, Mapping

from csm_jax.server.errors import error, refuse

KEYS_ENV = "CSM_JAX_API_KEYS"  # comma-separated keys
SUBPROTOCOL = "csm-jax"  # the WebSocket subprotocol the server selects
KEY_SUBPROTOCOL = "csm-jax.key."  # + the key, unpadded base64url: how a browser's WebSocket offers it


def collect_keys(flags: Iterable[str] = (), key_file: Path | None = None, env: Mapping[str, str] | None = None
                 ) -> tuple[str, ...]:
    """The server's keys: `flags` (--api-key), one a line of `key_file` (blank lines and # comments skipped),
    and $CSM_JAX_API_KEYS of `env` (comma-separated); all of them are valid. ValueError (or FileNotFoundError)
    for a file that is missing, unreadable or holds no key, an empty variable, or a key that is not printable
    ASCII without spaces (what an Authorization header carries)."""
    keys = [(k, "--api-key") for k in flags]
    if key_file is not None:
        try:
            text = Path(key_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"--api-key-file {key_file}: no such file; give a file with one key a line"
                                    ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file {key_file}: cannot be read ({e}); give a readable UTF-8 file with "
                             "one key a line") from None
        lines = [line.strip() for line in text.splitlines()]
        found = [(line, f"--api-key-file {key_file}") for line in lines if line and not line.startswith("#")]
        if not found:
            raise ValueError(f"--api-key-file {key_file} holds no key (blank lines and # comments are skipped); "
                             "put one key a line")
        keys += found
    value = (env or {}).get(KEYS_ENV)
    if value is not None:
        found = [(k.strip(), f"${KEYS_ENV}") for k in value.split(",") if k.strip()]
        if not found:
            raise ValueError(f"${KEYS_ENV} is set but holds no key; give comma-separated keys, or unset it")
        keys += found
    for key, where in keys:
        if not key or not all("!" <= c <= "~" for c in key):
            raise ValueError(f"a key from {where} is not printable ASCII without spaces (what "
                             "`Authorization: Bearer KEY` can carry); use letters, digits and punctuation")
    return tuple(dict.fromkeys(k for k, _ in keys))


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """The configured keys (as digests) and the check of a given one."""

    def __init__(self, keys: Iterable[str] = ()):
        self.digests = [_digest(k) for k in keys]

    def __bool__(self) -> bool:
        return bool(self.digests)

    def __len__(self) -> int:
        return len(self.digests)

    def valid(self, key: str | None) -> bool:
        """Whether `key` is one of the keys: compared with every one, in time that does not depend on which."""
        given = _digest(key or "")
        match = False
        for d in self.digests:
            match |= hmac.compare_digest(d, given)
        return match and key is not None

    @staticmethod
    def offered(scope) -> str | None:
        """The key a request (or WebSocket handshake) carries, None when it carries none."""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, key = value.decode("latin-1").strip().partition(" ")
                return key.strip() if scheme.lower() == "bearer" else None
        for proto in scope.get("subprotocols", ()) if scope["type"] == "websocket" else ():
            if proto.startswith(KEY_SUBPROTOCOL):
                data = proto[len(KEY_SUBPROTOCOL):]
                try:
                    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)).decode("utf-8")
                except ValueError:
                    return None
        return None


class RequireKey:
    """401 (before a WebSocket's upgrade too) for requests without a valid key, but on `open_paths`."""

    def __init__(self, app, keys: ApiKeys, open_paths: Iterable[str]):
        self.app, self.keys, self.open_paths = app, keys, frozenset(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or not self.keys or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        key = self.keys.offered(scope)
        if self.keys.valid(key):
            return await self.app(scope, receive, send)
        message = ("no API key: send one of the server's keys as `Authorization: Bearer KEY`" if key is None else
                   "invalid API key: send one of the server's keys as `Authorization: Bearer KEY`")
        refusal = error(401, message, code="invalid_api_key", **{"WWW-Authenticate": "Bearer"})
        await refuse(scope, receive, send, refusal, 1008)
