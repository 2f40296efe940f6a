"""Secrets never reach a process's arguments: a URI with a password on train.py's command line (an MLflow tracking
URI, say) is refused before Hydra, which would record it in the run's .hydra/overrides.yaml and config.yaml, as `ps`
shows it to every user of the machine. A module of its own, importing nothing heavy, so the refusal comes at once."""

from __future__ import annotations

from urllib.parse import urlsplit

PASSWORD_ON_COMMAND_LINE = (
    "{key}=: a URI with a password on the command line is refused: it would be visible in `ps` and recorded in the "
    "run's .hydra files; set MLFLOW_TRACKING_URI, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, in the "
    "environment instead"
)


def password_argument(argv: list[str]) -> str | None:
    """The key of the first key=value argument whose value holds a URI with a password (user:password@host), or
    None. The value is never returned: the caller names the setting only."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            continue
        for part in value.strip("[]").split(","):  # a sweep or a list: a=x,y or a=[x,y]
            try:
                if urlsplit(part.strip().strip("'\"")).password:
                    return key.lstrip("+~")
            except ValueError:  # not a URI (an unbalanced '[' in a host)
                continue
    return None
