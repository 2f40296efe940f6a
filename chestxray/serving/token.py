"""serve.py's token: from $CHESTXRAY_SERVE_TOKEN or token_file=, never from the command line. A module of its own,
importing nothing heavy, so that serve.py refuses `token=` at once, before Hydra, torch or the model load."""

from __future__ import annotations

import os
import re
from pathlib import Path

from chestxray.errors import ConfigError

TOKEN_VARIABLE = "CHESTXRAY_SERVE_TOKEN"
TOKEN_ON_COMMAND_LINE = (
    "token= on the command line is refused: it would be visible in `ps` and recorded in the run's .hydra files; "
    f"set the environment variable {TOKEN_VARIABLE}, or token_file=PATH (a file holding the token)"
)


MIN_LENGTH = 16
# What a client can send in an HTTP header as it is: printable ASCII. Other characters are sent as bytes the gate
# cannot compare equal to the token (headers are read as latin-1), so every request would be refused.
_SENDABLE = re.compile(r"[\x20-\x7e]+")
MAKE_ONE = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def token_argument(argv: list[str]) -> bool:
    """Whether the command line gives the token itself (token=, +token=, ++token=, ~token=)."""
    return any(arg.lstrip("+~").split("=", 1)[0] == "token" and "=" in arg for arg in argv)


def read_token(token_file: str | None, environ=os.environ) -> str | None:
    """The token from token_file= (its first line) or $CHESTXRAY_SERVE_TOKEN; None when neither; ConfigError when
    the file cannot be read or the token is empty. Never printed, logged or stored."""
    if token_file is not None:
        try:
            lines = Path(str(token_file)).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"token_file={token_file}: cannot be read ({type(err).__name__})") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise ConfigError(f"token_file={token_file} is empty: write the token on its first line")
        return checked(token, f"token_file={token_file}")
    token = environ.get(TOKEN_VARIABLE)
    if token is None:
        return None
    if not token.strip():
        raise ConfigError(f"${TOKEN_VARIABLE} is set but empty: give a secret, or unset it for no token")
    return checked(token.strip(), f"${TOKEN_VARIABLE}")


def checked(token: str, where: str) -> str:
    """The token, if a client can send it and cannot guess it: printable ASCII, at least MIN_LENGTH characters.
    The message says what is wrong, never the token."""
    if not _SENDABLE.fullmatch(token):
        raise ConfigError(
            f"{where}: the token may hold only printable ASCII characters (a client cannot send others in an HTTP "
            f"header as they are); make one with {MAKE_ONE}"
        )
    if len(token) < MIN_LENGTH:
        raise ConfigError(f"{where}: the token is shorter than {MIN_LENGTH} characters; make one with {MAKE_ONE}")
    return token
