"""Secrets in URIs: what a URI may carry of a credential (user:password@, a token as the user, token-like query
parameters) is removed from anything logged or written (redact_uri), and refused on train.py's command line before
Hydra, which would record it in the run's .hydra/overrides.yaml and config.yaml, as `ps` shows it to every user of
the machine (credential_argument). A module of its own, importing nothing heavy, so the refusal comes at once."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# query parameters of a URI that may hold a credential (?token=..., ?api_key=..., a signed URL's signature)
SECRET_PARAMETER = re.compile(r"token|secret|pass|pwd|key|sig|credential|auth", re.IGNORECASE)
# a user:password@ after a scheme, whatever urlsplit makes of the rest (an unbalanced ']', a ',' in the password)
USERINFO = re.compile(r"(://)[^/?#\s@]*@")
PASSWORD = re.compile(r"://[^/?#\s@]*:[^/?#\s]*@")

CREDENTIAL_ON_COMMAND_LINE = (
    "{key}=: a URI with a credential (user:password@, user@ or a token-like query parameter) on the command line is "
    "refused: it would be visible in `ps` and recorded in the run's .hydra files; set MLFLOW_TRACKING_URI, or "
    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, in the environment instead"
)


def redact_uri(value: str) -> str:
    """`value` without what a URI may carry of a secret (user:password@, token-like query parameters), for anything
    logged or written: https://alice:pw@host/?token=t is https://host/. Any other string is returned as it is."""
    try:
        parts = urlsplit(value)
    except ValueError:  # urlsplit refuses it (an unbalanced '[' or ']'): the userinfo is still removed
        return USERINFO.sub(r"\1", value)
    if not parts.scheme or not ("@" in parts.netloc or parts.query):
        return value
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not SECRET_PARAMETER.search(k)]
    netloc, query_text = parts.netloc.rpartition("@")[2], urlencode(query) if query else ""
    if (netloc, query_text) == (parts.netloc, parts.query):
        return value
    return urlunsplit(parts._replace(netloc=netloc, query=query_text))


def _strings(value: object) -> Iterator[str]:
    """Every string in a parsed override's value: quoted or not, in lists, dicts, choice(...) sweeps and globs."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
    elif hasattr(value, "text"):  # Hydra's QuotedString
        yield str(value.text)
    elif value is not None:
        for attribute in ("list", "include", "exclude"):  # ChoiceSweep, Glob
            yield from _strings(getattr(value, attribute, None))


def credential_argument(argv: list[str]) -> str | None:
    """The setting of the first override whose value holds a URI with a credential, as Hydra parses it (escapes,
    quotes, sweeps, lists and dicts), or as typed where Hydra cannot parse it; None if there is none. The value is
    never returned: the caller names the setting only."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        typed = arg.partition("=")[0].lstrip("+~")
        if PASSWORD.search(arg.replace("\\", "").replace("'", "").replace('"', "")):
            return typed
        try:
            override = parser.parse_overrides([arg])[0]
        except Exception:  # noqa: BLE001 - Hydra refuses it itself, with its own message
            continue
        if any(redact_uri(s) != s or PASSWORD.search(s) for s in _strings(override._value)):
            return override.key_or_group
    return None
