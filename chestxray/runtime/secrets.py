"""Secrets in URIs: what a URI may carry of a credential (user:password@, a token as the user, token-like query
parameters) is removed from anything logged or written (redact_uri), and refused on train.py's command line before
Hydra, which would record it in the run's .hydra/overrides.yaml and config.yaml, as `ps` shows it to every user of
the machine (credential_argument). A module of its own, importing nothing heavy, so the refusal comes at once."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# A query parameter names a secret by a short word of its own (?key=, ?sig=, ?auth=, ?api_key=, X-Amz-Signature) or by
# a long word anywhere in it (?accessToken=, ?clientSecret=, ?sessiontoken=); not ?author=, ?design=, ?monkey=.
SHORT_SECRET = re.compile(r"(^|_)(pass|pwd|key|sig|auth|api_?key)($|_)")
LONG_SECRET = re.compile(r"token|secret|passw|signature|credential")
# user:password@ after a scheme, a password of one character or more running to the last '@' (it may hold '@', '/',
# '?', '#' or ']', which end the host for urlsplit; a later '@' in the path is stripped with it); not a port
# (host:5000/path@x)
PASSWORD = re.compile(r"(://)[^/?#@\s:]*:(?!\d+(?:[/?#]|$))\S+@")
SECRET_QUERY = re.compile(r"([?&])([^=&#]*)=([^&#]*)")
INTERPOLATION = re.compile(r"\$\{[^}]*\}")  # ${oc.env:PW}: Hydra records it unresolved...
ENV_DEFAULT = re.compile(r"\$\{oc\.env:[^,}]*,([^}]*)\}")  # ...but the default of ${oc.env:PW,default} as typed
ENV_SET = "hydra.job.env_set."  # environment variables Hydra sets for the job, recorded in hydra.yaml
TOKEN_AS_USER = ("http", "https")  # where a user without a password is a token (not wasbs://container@, git@)


def _secret_name(name: str) -> bool:
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower().replace("-", "_").replace(".", "_")
    return bool(SHORT_SECRET.search(words) or LONG_SECRET.search(words))


CREDENTIAL_ON_COMMAND_LINE = (
    "{key}=: a credential (a URI's user:password@, an http(s) user@ or a secret query parameter, or a secret in "
    "hydra.job.env_set) on the command line is refused: it would be visible in `ps` and recorded in the run's "
    ".hydra files; set MLFLOW_TRACKING_URI, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, in the "
    "environment instead"
)


def redact_uri(value: str) -> str:
    """`value` without what a URI may carry of a secret (user:password@, a token as an http(s) user, secret query
    parameters), for anything logged or written: https://alice:pw@host/?token=t is https://host/. Any other string is
    returned as it is."""
    value = PASSWORD.sub(r"\1", value)
    try:
        parts = urlsplit(value)
    except ValueError:  # urlsplit refuses it (an unbalanced '[' or ']'): the secret query values still go
        return SECRET_QUERY.sub(lambda m: m.group(1) if _secret_name(m.group(2)) else m.group(0), value)
    if not parts.scheme or not ("@" in parts.netloc or parts.query):
        return value
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not _secret_name(k)]
    netloc = parts.netloc.rpartition("@")[2] if parts.scheme.lower() in TOKEN_AS_USER else parts.netloc
    query_text = urlencode(query) if query else ""
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


def has_credential(value: str, password_only: bool = False) -> bool:
    """Whether a string is a URI that holds a credential as typed: a password, a token as an http(s) user (user@
    without a password; a user:${oc.env:PW}@ is fine, Hydra records its password unresolved), or a secret query
    parameter with a value."""
    typed = INTERPOLATION.sub("", ENV_DEFAULT.sub(r"\1", value))
    if PASSWORD.search(typed):
        return True
    if password_only:
        return False
    try:
        parts = urlsplit(typed)
    except ValueError:
        return any(_secret_name(m.group(2)) and m.group(3) for m in SECRET_QUERY.finditer(typed))
    if not parts.scheme or not parts.netloc and not parts.query:
        return False
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at and userinfo and ":" not in userinfo and parts.scheme.lower() in TOKEN_AS_USER:
        return True
    return any(_secret_name(k) and v for k, v in parse_qsl(parts.query, keep_blank_values=True))


def credential_argument(argv: list[str]) -> str | None:
    """The setting of the first override whose value holds a URI with a credential (has_credential), as Hydra parses
    it (escapes, quotes, sweeps, lists and dicts); None if there is none. An override Hydra cannot parse is left to
    Hydra, which refuses it before it records anything. The value is never returned: the caller names the setting."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.partition("=")[0].lstrip("+~")
        if key.startswith(ENV_SET) and _secret_name(key[len(ENV_SET) :]) and arg.partition("=")[2]:
            return key  # a secret set in the job's environment (MLFLOW_TRACKING_PASSWORD=...), recorded as typed
        try:
            override = parser.parse_overrides([arg])[0]
        except Exception:  # noqa: BLE001 - Hydra refuses it itself, with its own message
            continue
        whole = getattr(override._value, "simple_form", False)  # a=x,y: a ',' may be inside a password
        if any(has_credential(s) for s in _strings(override._value)) or (
            whole and has_credential(arg.partition("=")[2], password_only=True)
        ):
            return override.key_or_group
    return None
