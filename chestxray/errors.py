"""The errors a user can act on: each message names the file or setting and what to do, so the entry points print
it without a traceback (`train.py: error: DataError: ...`) and exit with status 2."""

from __future__ import annotations


class UserError(RuntimeError):
    """A problem with the user's settings, files or data, said in full by its message."""


class ConfigError(UserError):
    """A setting out of its range or of the wrong type, found when the config is composed (before any work)."""


class DataError(UserError):
    """The data is missing or not laid out as the settings say: the message names the file or setting."""


class CacheError(UserError):
    """A cache folder cannot hold what it is for: a decoded-image store or an ONNX export (read-only, or too little
    free space)."""


class WeightsError(UserError):
    """ImageNet weights could not be had: says which setting to use instead."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: the message names the setting, the file and what is wrong."""


class ResumeError(UserError):
    """resume= or ckpt_path= cannot continue this run: the message says why and what to do."""


class OutputDirError(UserError):
    """The run folder cannot be written, or already holds another run: raised before any training starts."""


class PredictError(UserError):
    """A reason predict.py cannot produce any prediction."""


class AdaptError(UserError):
    """adapt.py cannot adapt to the site's images (too few per class, no labels): names the folder and the class."""


class MissingExtraError(UserError):
    """An optional feature whose packages are not installed: names the extra that brings them."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training diverged; raised before the bad step is applied, so the last checkpoint stays good."""


def require(module: str, extra: str, feature: str):
    """Import an optional dependency, or MissingExtraError naming the extra (pip install 'chestxray[extra]')."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{feature} needs the package {module.split('.')[0]!r}, which is not installed: "
            f"pip install 'chestxray[{extra}]' (or pip install -e '.[{extra}]' in a checkout)"
        ) from err
