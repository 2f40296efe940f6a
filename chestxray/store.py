"""Decode each image file once, into RAM for small sets or into a memory-mapped file on disk for large ones.

On disk (data.store=disk, or auto above 1 GiB of decoded images or with several processes per machine), a set
of files becomes one raw uint8 array of N x 3 x S x S in `cache_dir/stores/<key>/images.u8`, where the key is a
hash of the decode settings and of every file's content (SHA-256), as MONAI's PersistentDataset keys its cache
and FFCV lays out its memory-mapped files. Each process maps the file itself (nothing is pickled to DataLoader
workers), so workers and every DDP rank on a machine read the same pages of the page cache, and a process's own
memory does not grow with the number of images. A small pointer file in `cache_dir/index/` remembers which
store a list of files made, with each file's size and modification time, so a later run opens the store
without reading a single image; a changed file (different size or time) makes it read and hash the files again,
and different content makes a new store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from chestxray.images import DECODE_VERSION, DEFAULT_LIMITS, BadImageError, ImageLimits, model_view, read_bytes

log = logging.getLogger(__name__)

STORE_MODES = ("auto", "memory", "disk")
# data.store=auto keeps decoded images in RAM up to this size (317 images at 224 px: 48 MB; 100,000: 15 GB).
AUTO_DISK_BYTES = 1 << 30


def default_cache_dir() -> Path:
    """$CHESTXRAY_CACHE, else $XDG_CACHE_HOME/chestxray, else ~/.cache/chestxray."""
    if os.environ.get("CHESTXRAY_CACHE"):
        return Path(os.environ["CHESTXRAY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chestxray"


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class DecodeSettings:
    """Everything that changes the decoded pixels: part of every store's key."""

    image_size: int
    limits: ImageLimits = DEFAULT_LIMITS

    def key(self) -> str:
        lim = self.limits
        return f"v{DECODE_VERSION}-s{self.image_size}-max{lim.max_pixels}-min{lim.min_side}"


class ImageArray:
    """Decoded images by position (3 x S x S uint8 each), in RAM or in a file mapped by each process on first use."""

    def __init__(self, rows: np.ndarray, size: int, data: np.ndarray | None = None, file: Path | None = None):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.size = size
        self.file = file
        self._data = data

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            count = os.path.getsize(self.file) // (3 * self.size * self.size)
            shape = (count, 3, self.size, self.size)
            self._data = np.memmap(self.file, np.uint8, "r", shape=shape) if count else np.empty(shape, np.uint8)
        return self._data

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> np.ndarray:
        return np.array(self.data[self.rows[position]])  # a copy: writable, and not pinning the map

    def subset(self, positions: Sequence[int] | np.ndarray) -> ImageArray:
        """The same images (no copy), a selection of positions."""
        return ImageArray(self.rows[np.asarray(positions, dtype=np.int64)], self.size, self._data, self.file)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.file is not None:
            state["_data"] = None  # a worker or rank maps the file itself instead of receiving a copy
        return state


@dataclass
class DecodedImages:
    """The readable files of a list, their decoded images, and the files that could not be used."""

    paths: list[Path]
    images: ImageArray
    bad: list[BadImageError]
    store: Path | None = None  # the store folder, when on disk


def bounded_map(fn: Callable, items: Iterable, workers: int, window: int | None = None) -> Iterator:
    """fn over items in threads, results in completion order, at most `window` items in flight (bounded memory).

    Stopping early (an exception, Ctrl-C) cancels what has not started, so it returns within one item's time.
    """
    window = window or 4 * workers
    iterator = iter(items)
    pool = ThreadPoolExecutor(workers)
    pending: set[Future] = set()
    try:
        for item in iterator:
            pending.add(pool.submit(fn, item))
            if len(pending) >= window:
                break
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
                item = next(iterator, _END)
                if item is not _END:
                    pending.add(pool.submit(fn, item))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()


def choose_store(mode: str, count: int, image_size: int, processes_per_machine: int = 1) -> str:
    """'memory' or 'disk' for data.store=auto|memory|disk."""
    if mode not in STORE_MODES:
        raise ValueError(f"data.store must be one of {STORE_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    too_big = count * 3 * image_size * image_size > AUTO_DISK_BYTES
    return "disk" if too_big or processes_per_machine > 1 else "memory"


class _Decoder:
    """Decodes files into rows of an output array, in threads; rows are handed out as images succeed."""

    def __init__(self, paths: Sequence[Path], settings: DecodeSettings, out: np.ndarray, hash_content: bool = False):
        self.paths, self.settings, self.out = paths, settings, out
        self.rows = np.full(len(paths), -1, dtype=np.int64)
        # each file's SHA-256, for a disk store's content key (read from the bytes already in memory)
        self.sha256 = [""] * len(paths) if hash_content else None
        self.bad: dict[int, BadImageError] = {}
        self._next_row = 0
        self._lock = threading.Lock()

    def _one(self, position: int) -> None:
        path = self.paths[position]
        try:
            data = read_bytes(path)
            if self.sha256 is not None:
                self.sha256[position] = hashlib.sha256(data).hexdigest()
            image = model_view(data, path, self.settings.image_size, self.settings.limits)
        except BadImageError as err:
            self.bad[position] = err
            if self.sha256 is not None:
                self.sha256[position] = self.sha256[position] or "unreadable"
            return
        with self._lock:
            row, self._next_row = self._next_row, self._next_row + 1
        self.out[row] = image
        self.rows[position] = row

    def run(self, workers: int, progress: bool, what: str) -> int:
        with tqdm(
            total=len(self.paths), desc=f"decoding {what}", unit="img", disable=not progress, file=sys.stderr
        ) as bar:
            for _ in bounded_map(self._one, range(len(self.paths)), workers):
                bar.update()
        return self._next_row


def decode_in_memory(
    paths: Sequence[Path], settings: DecodeSettings, workers: int | None = None, progress: bool = False, what: str = ""
) -> DecodedImages:
    """Decode every file into one array in this process's memory (the fast path for small sets)."""
    paths = list(paths)
    size = settings.image_size
    out = np.empty((len(paths), 3, size, size), np.uint8)
    decoder = _Decoder(paths, settings, out)
    used = decoder.run(workers or default_workers(), progress, what)
    good = np.flatnonzero(decoder.rows >= 0)
    return DecodedImages(
        [paths[i] for i in good],
        ImageArray(decoder.rows[good], size, data=out[:used]),
        [decoder.bad[i] for i in sorted(decoder.bad)],
    )


# --- on disk ---------------------------------------------------------------------------------------------------


def _listing(paths: Sequence[Path]) -> list[list]:
    """[path, size, mtime, ctime, inode] per file (a chmod or a replaced file changes it); -1s if it is missing."""
    rows = []
    for p in paths:
        try:
            st = os.stat(p)
            rows.append([str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
        except OSError:
            rows.append([str(p), -1, -1, -1, -1])
    return rows


def _pointer_file(cache_dir: Path, settings: DecodeSettings, paths: Sequence[Path]) -> Path:
    digest = hashlib.sha256(settings.key().encode())
    for p in paths:
        digest.update(os.path.abspath(p).encode() + b"\0")
    return cache_dir / "index" / f"{digest.hexdigest()[:32]}.json"


def _store_key(settings: DecodeSettings, sha256: Sequence[str]) -> str:
    digest = hashlib.sha256(settings.key().encode())
    for s in sha256:
        digest.update(s.encode())
    return f"{settings.key()}-{digest.hexdigest()[:24]}"


def _write_json(path: Path, content: dict) -> None:
    """Whole or not at all: a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content))
    os.replace(tmp, path)


def _open_store(folder: Path, paths: Sequence[Path]) -> DecodedImages:
    meta = json.loads((folder / "meta.json").read_text())
    if len(meta["rows"]) != len(paths):
        raise ValueError(f"store {folder} holds {len(meta['rows'])} files, not {len(paths)}")
    rows = np.asarray(meta["rows"], dtype=np.int64)
    good = np.flatnonzero(rows >= 0)
    bad = [BadImageError(paths[int(i)], reason) for i, reason in meta["bad"]]
    return DecodedImages(
        [paths[i] for i in good],
        ImageArray(rows[good], meta["image_size"], file=folder / "images.u8"),
        bad,
        folder,
    )


def _build_store(
    paths: Sequence[Path], settings: DecodeSettings, cache_dir: Path, workers: int, progress: bool, what: str
) -> Path:
    """Decode into a new folder beside the stores, then move it into place under its content key."""
    size = settings.image_size
    stores = cache_dir / "stores"
    stores.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=stores))
    try:
        file = tmp / "images.u8"
        out = np.memmap(file, np.uint8, "w+", shape=(max(len(paths), 1), 3, size, size))
        decoder = _Decoder(paths, settings, out, hash_content=True)
        used = decoder.run(workers, progress, what)
        out.flush()
        del out
        os.truncate(file, used * 3 * size * size)  # the rows of unreadable files were never used
        meta = {
            "settings": settings.key(),
            "image_size": size,
            "rows": decoder.rows.tolist(),
            "sha256": decoder.sha256,
            "bad": [[i, err.reason] for i, err in sorted(decoder.bad.items())],
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        key = _store_key(settings, decoder.sha256)
        final = stores / key
        try:
            os.rename(tmp, final)
        except OSError as err:
            if not (final / "meta.json").exists():
                raise
            log.debug("store %s was built by another process (%s); keeping it", final, err)
            shutil.rmtree(tmp, ignore_errors=True)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def decode_to_store(
    paths: Sequence[Path],
    settings: DecodeSettings,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = False,
    what: str = "",
) -> DecodedImages:
    """Open the on-disk store of these files, building it first when their content has not been decoded yet."""
    paths = list(paths)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    pointer = _pointer_file(cache_dir, settings, paths)
    listing = _listing(paths)
    if pointer.exists():
        try:
            remembered = json.loads(pointer.read_text())
            folder = cache_dir / "stores" / remembered["store"]
            if remembered["files"] == listing and (folder / "meta.json").exists():
                return _open_store(folder, paths)
        except (OSError, ValueError, KeyError) as err:
            log.warning("ignoring unreadable store pointer %s: %s", pointer, err)
    folder = _build_store(paths, settings, cache_dir, workers or default_workers(), progress, what)
    decoded = _open_store(folder, paths)
    if not any(err.reason.startswith("cannot read file") for err in decoded.bad):  # may be readable next time
        _write_json(pointer, {"store": folder.name, "files": listing})
    return decoded


def decode_images(
    paths: Sequence[Path],
    settings: DecodeSettings,
    store: str = "memory",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    what: str = "",
) -> DecodedImages:
    """Decode in RAM (store='memory') or through the on-disk store (store='disk'); see choose_store for 'auto'."""
    if store == "disk":
        return decode_to_store(paths, settings, cache_dir, progress=progress, what=what)
    return decode_in_memory(paths, settings, progress=progress, what=what)
