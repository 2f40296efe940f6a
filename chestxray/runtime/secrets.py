"""Secrets in URIs: what a URI may carry of a credential (user:password@, a token as the user, token-like query
parameters) is removed from anything logged or written (redact_uri), and refused on train.py's command line before
Hydra, which would record it in the run's .hydra/overrides.yaml and config.yaml, as `ps` shows it to every user of
the machine (credential_argument). A module of its own, importing nothing heavy, so the refusal comes at once."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# query parameters of a URI that may hold a credential (?token=..., ?api_key=..., a signed URL's X-Amz-Signature): the
# name's words, not any name that contains one (?author=, ?design= are not secrets)
SECRET_PARAMETER = re.compile(
    r"(^|[_.-])(token|secret|password|passwd|pass|pwd|api_?key|key|sig|signature|credentials?|auth)($|[_.-])",
    re.IGNORECASE,
)
# where urlsplit refuses a URI (an unbalanced '[' or ']'): its userinfo, up to the last '@' before the path, and a
# secret query parameter's value
USERINFO = re.compile(r"(://)[^/?#\s]*@")
SECRET_QUERY = re.compile(
    r"([?&])[^=&#]*?(token|secret|password|passwd|pwd|api_?key|sig|signature|credentials?|auth)[^=&#]*=[^&#]*",
    re.IGNORECASE,
)
INTERPOLATION = re.compile(r"\$\{[^}]*\}")  # ${oc.env:PW}: Hydra records it unresolved

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
    except ValueError:  # urlsplit refuses it (an unbalanced '[' or ']'): the userinfo and secrets still go
        return SECRET_QUERY.sub(r"\1", USERINFO.sub(r"\1", value))
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


def has_credential(value: str) -> bool:
    """Whether a string is a URI that holds a credential as typed: a password, a user that is a token (user@ without a
    password: a user:${oc.env:PW}@ is fine, its password is recorded unresolved), or a secret query parameter with a
    value."""
    typed = INTERPOLATION.sub("", value)
    try:
        parts = urlsplit(typed)
    except ValueError:
        return SECRET_QUERY.sub(r"\1", USERINFO.sub(r"\1", typed)) != typed
    if not parts.scheme or not parts.netloc and not parts.query:
        return False
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at and (parts.password or (userinfo and ":" not in userinfo)):
        return True
    return any(SECRET_PARAMETER.search(k) and v for k, v in parse_qsl(parts.query, keep_blank_values=True))


def credential_argument(argv: list[str]) -> str | None:
    """The setting of the first override whose value holds a URI with a credential (has_credential), as Hydra parses
    it (escapes, quotes, sweeps, lists and dicts); None if there is none. An override Hydra cannot parse is left to
    Hydra, which refuses it before it records anything. The value is never returned: the caller names the setting."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_overrides([arg])[0]
        except Exception:  # noqa: BLE001 - Hydra refuses it itself, with its own message
            continue
        strings = list(_strings(override._value))
        if getattr(override._value, "simple_form", False):  # a=x,y: a ',' may be inside a password
            strings.append(arg.partition("=")[2])
        if any(has_credential(s) for s in strings):
            return override.key_or_group
    return None
