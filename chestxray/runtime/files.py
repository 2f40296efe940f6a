"""Files written whole or not at all, and where caches live."""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def default_cache_dir() -> Path:
    """$CHESTXRAY_CACHE, else $XDG_CACHE_HOME/chestxray, else ~/.cache/chestxray."""
    if os.environ.get("CHESTXRAY_CACHE"):
        return Path(os.environ["CHESTXRAY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chestxray"


def numbered(base: str | os.PathLike) -> Iterator[Path]:
    """`base`, then `base_2`, `base_3`...: the names a run folder takes when an earlier one has the name."""
    path = Path(base)
    yield path
    for k in itertools.count(2):
        yield path.with_name(f"{path.name}_{k}")


def probe_writable(folder: str | os.PathLike) -> None:
    """Make `folder` and a file in it (removed at once): an OSError now, naming the cause, instead of one after the
    work whose result it was to hold."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
        pass


def _umask() -> int:
    """The process's umask (read by setting it, so set it straight back: done once, at import, before any thread
    could create a file in between)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it replaces `path` in one step (os.replace), on any error
    (or a kill) `path` keeps its old content and the temporary file is removed. A reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide reports and checkpoints from a shared group
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, content: str | bytes) -> Path:
    """Write text or bytes to `path` whole or not at all (see atomic_writer)."""
    with atomic_writer(path, "wb" if isinstance(content, bytes) else "w") as fh:
        fh.write(content)
    return Path(path)


def atomic_copy(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy a file so that `target` is whole or absent."""
    with open(source, "rb") as src, atomic_writer(target, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    return Path(target)
