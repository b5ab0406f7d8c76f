"""Credentials out of whatever describes an LM: URLs, headers, saved LM state and error text.

Whatever describes an LM in a file, a report or a log line goes through these functions, so an API key, a
``user:password@`` in a URL or a bearer token never reaches disk or the terminal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "REDACTED"
_SECRET_PART = re.compile(r"key|token|secret|passw|pwd|auth|sig|credential|session|cookie", re.IGNORECASE)
"""Query parameter and header names whose values are credentials (``?key=``, ``Authorization``, ``X-Api-Key``)."""
_SECRET_SETTING = re.compile(r"(^|_)(api_key|key|secret|password|credentials?|access_token|session_token|"
                             r"ad_token|refresh_token)$|secret|password|credential", re.IGNORECASE)
"""LM settings holding a credential (``api_key``, ``aws_secret_access_key``...), but not ``max_tokens``."""
_URL_SETTINGS = ("api_base", "base_url")
_HEADER_SETTINGS = ("extra_headers", "headers", "extra_query")
_URL_IN_TEXT = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.IGNORECASE)
_BEARER = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)

def redact_url(url: str | None) -> str | None:
    """A URL without credentials: no user:password@, secret-looking query values (``?key=``) replaced."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return REDACTED  # not parsable: it cannot be shown safely
    netloc = parts.netloc
    if parts.username is not None or parts.password is not None:
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        netloc = f"{host}:{port}" if port else host
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PART.search(name) for name, _ in pairs):
            query = urlencode([(name, REDACTED if _SECRET_PART.search(name) else value) for name, value in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

def redact_headers(headers: Mapping[str, Any] | None, *, drop: bool = False) -> dict[str, Any] | None:
    """Headers (or query parameters) with credential values replaced (or dropped): Authorization, X-Api-Key..."""
    if headers is None:
        return None
    clean = {}
    for name, value in dict(headers).items():
        if not _SECRET_PART.search(str(name)):
            clean[name] = value
        elif not drop:
            clean[name] = REDACTED
    return clean

def redact_lm_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """An LM's settings or dspy state (``LM.dump_state()``) as safe to write: credentials dropped or replaced.

    Credential headers are dropped rather than replaced: dspy restores a predictor's headers when it loads the
    state, and a placeholder would then be sent as if it were a credential.
    """
    clean: dict[str, Any] = {}
    for key, value in state.items():
        if _SECRET_SETTING.search(str(key)):
            continue
        if key in _URL_SETTINGS and isinstance(value, str):
            value = redact_url(value)
        elif key in _HEADER_SETTINGS and isinstance(value, Mapping):
            value = redact_headers(value, drop=True)
        clean[key] = value
    return clean

def redact_text(text: str) -> str:
    """Free text (an error message) with every URL redacted and bearer tokens replaced."""
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)) or "",
                                                                             text))

