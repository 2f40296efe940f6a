"""Decode each image file once, into RAM for small sets or into a memory-mapped file on disk for large ones.

On disk (data.store=disk, or auto above 1 GiB of decoded images or with several processes per machine), a set
of files becomes one raw uint8 array of N x 3 x S x S in `cache_dir/stores/<key>/images.u8`, where the key is a
hash of the decode settings and of every file's content (SHA-256), as MONAI's PersistentDataset keys its cache
and FFCV lays out its memory-mapped files. Each process maps the file itself (nothing is pickled to DataLoader
workers), so workers and every DDP rank on a machine read the same pages of the page cache, and a process's own
memory does not grow with the number of images. A small pointer file in `cache_dir/index/` remembers which
store a list of files made, with each file's size, times and inode, so a later run opens the store without reading
a single image; a changed file makes it read and hash the files again, and different content makes a new store.

A store proves its bytes before they are used:
- on open, its structure: meta.json whole, images.u8 exactly as long as its rows, no damage mark. A store that is
  incomplete or unreadable is reported in one warning naming it and rebuilt (the broken folder is replaced).
- on every read, the row's CRC-32 against the one recorded when it was written (about 60 us for a 224 px image, a
  small fraction of a training step: benchmarks/store_checksum.py). A row that fails is decoded again from its
  file, served only if that file still has the recorded SHA-256 and the decode has the recorded CRC, and the store
  is marked damaged so that the next start rebuilds it.
Building checks the free space first (the size is known before a pixel is decoded) and allocates the whole file
(posix_fallocate), so a full disk is one clear error, or a fall-back to RAM when the images fit there, never a
SIGBUS halfway; a `.building-*` folder left by a killed build is removed by the next build (none holds its lock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from chestxray.data.images import DECODE_VERSION, DEFAULT_LIMITS, BadImageError, ImageLimits, model_view, read_bytes
from chestxray.errors import CacheError
from chestxray.runtime.files import atomic_write, default_cache_dir, probe_writable
from chestxray.runtime.parallel import available_cpus, bounded_map

log = logging.getLogger(__name__)

STORE_MODES = ("auto", "memory", "disk")
# data.store=auto keeps decoded images in RAM up to this size (317 images at 224 px: 48 MB; 100,000: 15 GB).
AUTO_DISK_BYTES = 1 << 30
STORE_FORMAT = 4  # bump when the layout of a store folder changes
DAMAGED = "DAMAGED"  # a file in a store folder: a row failed its checksum, rebuild at the next open
SPACE_MARGIN = 64 << 20  # bytes left free on the cache's disk after a store is allocated


@dataclass(frozen=True)
class DecodeSettings:
    """Everything that changes the decoded pixels: part of every store's key."""

    image_size: int
    limits: ImageLimits = DEFAULT_LIMITS

    def key(self) -> str:
        lim = self.limits
        key = f"v{DECODE_VERSION}-s{self.image_size}-max{lim.max_pixels}-min{lim.min_side}-lateral{lim.lateral}"
        return key if lim.preprocess == "none" else f"{key}-{lim.preprocess}"

    @property
    def row_bytes(self) -> int:
        return 3 * self.image_size * self.image_size


@dataclass
class StoreFile:
    """What a process needs to read and prove the rows of an on-disk store (pickled to DataLoader workers)."""

    folder: Path
    settings: DecodeSettings
    checksums: np.ndarray  # CRC-32 of each store row, as written (row i: the i-th file)
    sources: list[str]  # the file each store row was decoded from
    sha256: np.ndarray  # N x 32 bytes: that file's SHA-256 when it was decoded
    _warned: bool = field(default=False, repr=False)

    @property
    def file(self) -> Path:
        return self.folder / "images.u8"

    def heal(self, row: int) -> np.ndarray:
        """The row decoded again from its file, proven by the recorded SHA-256 and CRC; the store marked damaged."""
        source = self.sources[row]
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"decoded-image store {self.folder} is damaged: row {row} ({source}) fails its checksum; rows that "
                "fail are decoded again from their files, and the store will be rebuilt at the next start",
                stacklevel=3,
            )
        with contextlib.suppress(OSError):  # a read-only cache: the next open finds the bad row the same way
            (self.folder / DAMAGED).write_text(f"row {row} failed its checksum\n")
        problem = "its file has changed since it was decoded"
        with contextlib.suppress(BadImageError):
            data = read_bytes(source)
            if hashlib.sha256(data).digest() == self.sha256[row].tobytes():
                image = model_view(data, source, self.settings.image_size, self.settings.limits)
                if zlib.crc32(image) == self.checksums[row]:
                    return image
                problem = "it decodes differently now"
        raise CacheError(
            f"decoded-image store {self.folder}: row {row} ({source}) fails its checksum and cannot be decoded "
            f"again ({problem}); start the run again to rebuild the store"
        )


class ImageArray:
    """Decoded images by position (3 x S x S uint8 each), in RAM or in a file mapped by each process on first use."""

    def __init__(self, rows: np.ndarray, size: int, data: np.ndarray | None = None, store: StoreFile | None = None):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.size = size
        self.store = store
        self.verify = True  # check each row of a disk store against its checksum (off only to measure its cost)
        self._data = data

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            count = len(self.store.checksums)
            shape = (count, 3, self.size, self.size)
            self._data = np.memmap(self.store.file, np.uint8, "r", shape=shape) if count else np.empty(shape, np.uint8)
        return self._data

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> np.ndarray:
        row = int(self.rows[position])
        image = np.array(self.data[row])  # a copy: writable, and not pinning the map
        if self.store is not None and self.verify and zlib.crc32(image) != self.store.checksums[row]:
            image = self.store.heal(row)
        return image

    def subset(self, positions: Sequence[int] | np.ndarray) -> ImageArray:
        """The same images (no copy), a selection of positions."""
        chosen = ImageArray(self.rows[np.asarray(positions, dtype=np.int64)], self.size, self._data, self.store)
        chosen.verify = self.verify
        return chosen

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.store is not None:
            state["_data"] = None  # a worker or rank maps the file itself instead of receiving a copy
        return state


@dataclass
class DecodedImages:
    """The readable files of a list, their decoded images, and the files that could not be used."""

    paths: list[Path]
    images: ImageArray
    bad: list[BadImageError]
    store: Path | None = None  # the store folder, when on disk


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
        # row i holds file i: the same files and settings always give the same bytes (a store built twice, by two
        # processes, is identical); an unreadable file's row stays zeros and unused
        self.rows = np.full(len(paths), -1, dtype=np.int64)
        # each file's SHA-256 (the store's content key) and each row's CRC-32 (its proof), for a disk store
        self.sha256 = [""] * len(paths) if hash_content else None
        self.checksums = np.zeros(len(paths), np.uint32)
        self.bad: dict[int, BadImageError] = {}

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
        self.out[position] = image
        self.checksums[position] = zlib.crc32(image)
        self.rows[position] = position

    def run(self, workers: int, progress: bool, what: str) -> None:
        with tqdm(
            total=len(self.paths), desc=f"decoding {what}", unit="img", disable=not progress, file=sys.stderr
        ) as bar:
            for _ in bounded_map(self._one, range(len(self.paths)), workers):
                bar.update()


def decode_in_memory(
    paths: Sequence[Path], settings: DecodeSettings, workers: int | None = None, progress: bool = False, what: str = ""
) -> DecodedImages:
    """Decode every file into one array in this process's memory (the fast path for small sets)."""
    paths = list(paths)
    size = settings.image_size
    out = np.empty((len(paths), 3, size, size), np.uint8)
    decoder = _Decoder(paths, settings, out)
    decoder.run(workers or available_cpus(), progress, what)
    good = np.flatnonzero(decoder.rows >= 0)
    return DecodedImages(
        [paths[i] for i in good],
        ImageArray(decoder.rows[good], size, data=out),
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


class BrokenStore(Exception):
    """A store folder that cannot be used as it is (the message says why)."""


def _open_store(folder: Path, paths: Sequence[Path], settings: DecodeSettings) -> DecodedImages:
    """The store's images for these files, after checking that the folder is whole; BrokenStore if it is not."""
    if (folder / DAMAGED).exists():
        raise BrokenStore(f"marked damaged: {(folder / DAMAGED).read_text().strip()}")
    try:
        meta = json.loads((folder / "meta.json").read_text())
        rows = np.asarray(meta["rows"], dtype=np.int64)
        checksums = np.asarray(meta["checksums"], dtype=np.uint32)
        sha256, bad_rows, size = meta["sha256"], meta["bad"], int(meta["image_size"])
        fmt = meta["format"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BrokenStore(f"meta.json unreadable ({type(err).__name__}: {err})") from None
    if fmt != STORE_FORMAT or size != settings.image_size:
        raise BrokenStore(f"format {fmt} at {size} px, not format {STORE_FORMAT} at {settings.image_size} px")
    n = len(paths)
    if len(rows) != n or len(sha256) != n or len(checksums) != n:
        raise BrokenStore(f"holds {len(rows)} files, not {n}")
    good = np.flatnonzero(rows >= 0)
    if not np.array_equal(rows[good], good):
        raise BrokenStore("meta.json's rows are not the files' positions")
    try:
        length = os.path.getsize(folder / "images.u8")
    except OSError as err:
        raise BrokenStore(f"images.u8 unreadable ({err.strerror or err})") from None
    if length != max(n, 1) * settings.row_bytes:
        raise BrokenStore(f"images.u8 is {length:,} bytes, not the {max(n, 1) * settings.row_bytes:,} of {n} rows")
    digests = np.zeros((n, 32), np.uint8)
    for position in good:
        digests[position] = np.frombuffer(bytes.fromhex(sha256[position]), np.uint8)
    store = StoreFile(folder, settings, checksums, [str(p) for p in paths], digests)
    return DecodedImages(
        [paths[i] for i in good],
        ImageArray(rows[good], size, store=store),
        [BadImageError(paths[int(i)], reason) for i, reason in bad_rows],
        folder,
    )


def _remove_stale_builds(stores: Path) -> None:
    """Remove `.building-*` folders that no live process holds (left by a kill -9, a full disk, a power cut), and
    `.trash-*` folders (broken stores whose removal was cut short). A builder holds its folder's lock from the
    moment it has made it; a folder younger than a minute without a lock file may be one whose builder has not
    taken the lock yet, so it is left for the next build."""
    for folder in stores.glob(".trash-*"):
        shutil.rmtree(folder, ignore_errors=True)
    for folder in stores.glob(".building-*"):
        lock = folder / ".lock"
        try:
            if not lock.exists() and time.time() - folder.stat().st_mtime < 60:
                continue
            with open(lock, "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by its builder while it is alive
                shutil.rmtree(folder, ignore_errors=True)
                log.info("removed %s, left by an interrupted build", folder)
        except OSError:  # BlockingIOError: being built right now
            continue


def _memory_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where unknown)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as fh:
            line = next(line for line in fh if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return 0


class NoSpace(Exception):
    """The cache's disk cannot hold the store; the message says how much it needs."""


def _allocate(file: Path, size: int) -> np.memmap:
    """The store's file, with every block allocated before a pixel is written: a full disk fails here (ENOSPC),
    never as a SIGBUS when the mapped pages are written."""
    with open(file, "wb") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, size)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise NoSpace(f"cannot allocate {size:,} bytes ({err.strerror})") from None
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            zeros = bytes(1 << 20)  # a file system without fallocate: write the zeros, which fails cleanly
            for start in range(0, size, len(zeros)):
                try:
                    fh.write(zeros[: min(len(zeros), size - start)])
                except OSError as write_err:
                    raise NoSpace(f"cannot write {size:,} bytes ({write_err.strerror})") from None
    return np.memmap(file, np.uint8, "r+", shape=(size,))


def _build_store(
    paths: Sequence[Path], settings: DecodeSettings, cache_dir: Path, workers: int, progress: bool, what: str
) -> Path:
    """Decode into a new folder beside the stores, then move it into place under its content key."""
    stores = cache_dir / "stores"
    stores.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(stores)
    size = max(len(paths), 1) * settings.row_bytes
    free = shutil.disk_usage(stores).free
    if free < size + SPACE_MARGIN:
        raise NoSpace(f"{free:,} bytes free")
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{os.getpid()}-", dir=stores))
    lock = open(tmp / ".lock", "w")  # noqa: SIM115 - held until the folder is moved or removed
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        file = tmp / "images.u8"
        out = _allocate(file, size).reshape(-1, 3, settings.image_size, settings.image_size)
        decoder = _Decoder(paths, settings, out, hash_content=True)
        decoder.run(workers, progress, what)
        out.flush()
        del out
        meta = {
            "format": STORE_FORMAT,
            "settings": settings.key(),
            "image_size": settings.image_size,
            "rows": decoder.rows.tolist(),
            "sha256": decoder.sha256,
            "checksums": decoder.checksums.tolist(),
            "bad": [[i, err.reason] for i, err in sorted(decoder.bad.items())],
        }
        atomic_write(tmp / "meta.json", json.dumps(meta))
        final = _move_into_place(tmp, stores / _store_key(settings, decoder.sha256), paths, settings)
        with contextlib.suppress(OSError):
            (final / ".lock").unlink()  # moved with the folder, still held until this build returns
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.close()


def _move_into_place(tmp: Path, final: Path, paths: Sequence[Path], settings: DecodeSettings) -> Path:
    """Rename the built folder to its key, under a lock per key: a whole store already there (built meanwhile by
    another process) is kept, a broken one is replaced, with a warning naming it."""
    locks = final.parent.parent / "locks"
    locks.mkdir(exist_ok=True)
    with open(locks / final.name, "a") as key_lock:
        fcntl.flock(key_lock, fcntl.LOCK_EX)
        if final.exists():
            try:
                _open_store(final, paths, settings)
                log.debug("store %s was built by another process; keeping it", final)
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            except BrokenStore as err:
                warnings.warn(f"decoded-image store {final} is broken ({err}): rebuilt", stacklevel=4)
                trash = final.with_name(f".trash-{os.getpid()}-{final.name}")
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, final)
        return final


def _check_writable(cache_dir: Path) -> None:
    try:
        probe_writable(cache_dir / "stores")
    except OSError as err:
        raise CacheError(
            f"cannot write the decoded-image cache folder {cache_dir} (data.cache_dir, or $CHESTXRAY_CACHE): "
            f"{err.strerror or err}; point data.cache_dir at a writable folder, or use data.store=memory"
        ) from None


def decode_to_store(
    paths: Sequence[Path],
    settings: DecodeSettings,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = False,
    what: str = "",
    fallback: bool = True,
) -> DecodedImages:
    """Open the on-disk store of these files, building it first when their content has not been decoded yet (or its
    store is broken). Without room on the cache's disk: decoded in RAM instead when they fit there (fallback),
    else CacheError naming the folder and the bytes needed."""
    paths = list(paths)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    pointer = _pointer_file(cache_dir, settings, paths)
    listing = _listing(paths)
    if pointer.exists():
        folder = None
        try:
            remembered = json.loads(pointer.read_text())
            folder = cache_dir / "stores" / remembered["store"]
            if remembered["files"] == listing:
                return _open_store(folder, paths, settings)
        except (OSError, ValueError, KeyError, TypeError) as err:
            warnings.warn(f"ignoring unreadable store pointer {pointer}: {err}", stacklevel=2)
        except BrokenStore:
            pass  # rebuilt below: replacing it under its key says so, once
    _check_writable(cache_dir)
    try:
        folder = _build_store(paths, settings, cache_dir, workers or available_cpus(), progress, what)
    except NoSpace as err:
        needed = len(paths) * settings.row_bytes
        if fallback and needed < _memory_available() // 2:
            warnings.warn(
                f"no room for a {needed:,}-byte decoded-image store in {cache_dir} ({err}): decoding into memory "
                "instead (free space there, or point data.cache_dir elsewhere, to keep it for the next run)",
                stacklevel=2,
            )
            return decode_in_memory(paths, settings, workers, progress, what)
        raise CacheError(
            f"the decoded-image cache folder {cache_dir} (data.cache_dir, or $CHESTXRAY_CACHE) has no room for "
            f"{needed:,} bytes of decoded images ({err}); free space there or point data.cache_dir elsewhere"
        ) from None
    try:
        decoded = _open_store(folder, paths, settings)
    except BrokenStore as err:
        raise CacheError(f"decoded-image store {folder} is broken right after it was built ({err})") from None
    if not any(err.reason.startswith("cannot read file") for err in decoded.bad):  # may be readable next time
        with contextlib.suppress(OSError):
            atomic_write(pointer, json.dumps({"store": folder.name, "files": listing}))
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
