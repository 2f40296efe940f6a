"""The decoded-image store: bit-identical to a direct decode, keyed by content and settings, shared, reused."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from chestxray.data import store as store_module
from chestxray.data.images import ImageLimits, load_image
from chestxray.data.store import DecodeSettings, choose_store, decode_in_memory, decode_to_store
from tests.conftest import ROOT


@pytest.fixture
def files(tmp_path, data_dir):
    """A copy of some dataset files of every kind (JPEG, grey, PNG of any depth), plus one bad file."""
    folder = tmp_path / "files"
    folder.mkdir()
    sources = sorted((data_dir / "train").rglob("*.*"))
    picked = [p for p in sources if p.suffix.lower() == ".png"][:2] + [
        p for p in sources if p.suffix.lower() != ".png"
    ][:6]
    paths = []
    for i, src in enumerate(picked):
        paths.append(folder / f"{i:02d}{src.suffix}")
        shutil.copy(src, paths[-1])
    (folder / "bad.jpg").write_text("not an image")
    return [*paths[:3], folder / "bad.jpg", *paths[3:]]


def direct(paths, size):
    return [load_image(p, size) for p in paths]


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_store_is_bit_identical_to_a_direct_decode_and_reports_bad_files(files, tmp_path, mode):
    settings = DecodeSettings(48)
    if mode == "disk":
        decoded = decode_to_store(files, settings, tmp_path / "cache")
    else:
        decoded = decode_in_memory(files, settings)
    good = [p for p in files if p.name != "bad.jpg"]
    assert decoded.paths == good
    assert [e.path for e in decoded.bad] == [str(files[3])] and "not a JPEG, PNG, TIFF or DICOM image" in decoded.bad[
        0
    ].reason
    for i, expected in enumerate(direct(good, 48)):
        assert np.array_equal(decoded.images[i], expected), good[i]
    if mode == "disk":
        assert isinstance(decoded.images.data, np.memmap)  # mapped from the file, not read into this process


def test_second_open_reads_no_image_file(files, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = decode_to_store(files, DecodeSettings(48), cache)

    def no_reading(path):
        raise AssertionError(f"the store was not used: {path} was read again")

    monkeypatch.setattr(store_module, "read_bytes", no_reading)
    again = decode_to_store(files, DecodeSettings(48), cache)
    assert again.store == first.store and again.paths == first.paths
    assert [e.reason for e in again.bad] == [e.reason for e in first.bad]
    assert all(np.array_equal(again.images[i], first.images[i]) for i in range(len(first.paths)))


def test_changed_setting_or_content_makes_a_new_store(files, tmp_path):
    cache = tmp_path / "cache"
    base = decode_to_store(files, DecodeSettings(48), cache)
    other_size = decode_to_store(files, DecodeSettings(32), cache)
    other_limits = decode_to_store(files, DecodeSettings(48, ImageLimits(min_side=40)), cache)
    assert len({base.store, other_size.store, other_limits.store}) == 3
    assert other_size.images[0].shape == (3, 32, 32) and np.array_equal(other_size.images[0], direct(files[:1], 32)[0])

    shutil.copy(files[1], files[0])  # new content (and a new modification time) for the first file
    changed = decode_to_store(files, DecodeSettings(48), cache)
    assert changed.store != base.store
    assert np.array_equal(changed.images[0], direct(files[1:2], 48)[0])

    shutil.copy(files[0], files[0].with_suffix(".tmp"))
    files[0].with_suffix(".tmp").replace(files[0])  # same content, new time: read and hashed again, same store
    assert decode_to_store(files, DecodeSettings(48), cache).store == changed.store


def test_two_processes_building_one_store_at_once_read_the_same_bytes(files, tmp_path):
    cache = tmp_path / "cache"  # empty: both processes decode, one store stays, both read it
    script = (
        "import sys, json, hashlib, pathlib\n"
        "from chestxray.data.store import decode_to_store, DecodeSettings\n"
        "paths = [pathlib.Path(p) for p in json.loads(sys.argv[1])]\n"
        "d = decode_to_store(paths, DecodeSettings(48), sys.argv[2])\n"
        "print(d.store, hashlib.sha256(b''.join(d.images[i].tobytes() for i in range(len(d.paths)))).hexdigest())\n"
    )
    cmd = [sys.executable, "-c", script, json.dumps([str(p) for p in files]), str(cache)]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    decoded = decode_to_store(files, DecodeSettings(48), cache)
    import hashlib

    ours = hashlib.sha256(b"".join(decoded.images[i].tobytes() for i in range(len(decoded.paths)))).hexdigest()
    assert outputs == {f"{decoded.store} {ours}"}
    assert [p.name for p in (cache / "stores").iterdir()] == [decoded.store.name]  # no half-built folder left


def test_auto_goes_to_disk_when_large_or_shared_by_processes():
    assert choose_store("auto", 300, 224) == "memory"
    assert choose_store("auto", 100_000, 224) == "disk"  # 15 GB of decoded images
    assert choose_store("auto", 300, 224, processes_per_machine=2) == "disk"
    assert choose_store("memory", 100_000, 224) == "memory"
    with pytest.raises(ValueError, match="data.store must be one of"):
        choose_store("ram", 10, 32)


# --- a store that proves its bytes and heals -------------------------------------------------------------------


def only_store(cache) -> Path:
    [folder] = [p for p in (cache / "stores").iterdir() if not p.name.startswith(".")]
    return folder


def same_as_direct(decoded, files, size=48) -> bool:
    good = [p for p in files if p.name != "bad.jpg"]
    return decoded.paths == good and all(
        np.array_equal(decoded.images[i], expected) for i, expected in enumerate(direct(good, size))
    )


@pytest.mark.parametrize("damage", ["truncate images", "delete images", "cut meta", "delete pointer too"])
def test_a_damaged_store_is_reported_once_and_rebuilt(files, tmp_path, damage):
    cache = tmp_path / "cache"
    decode_to_store(files, DecodeSettings(48), cache)
    folder = only_store(cache)
    images, meta = folder / "images.u8", folder / "meta.json"
    if damage == "truncate images":
        os.truncate(images, images.stat().st_size // 2)
    elif damage == "delete images":
        images.unlink()
    else:
        meta.write_text(meta.read_text()[:40])
        if damage == "delete pointer too":  # the fresh build must replace the broken folder of the same key
            for pointer in (cache / "index").iterdir():
                pointer.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = decode_to_store(files, DecodeSettings(48), cache)
    messages = [str(w.message) for w in caught]
    assert len([m for m in messages if str(folder) in m and "broken" in m]) == 1, messages
    assert again.store == folder and same_as_direct(again, files)
    assert sorted(p.name for p in (cache / "stores").iterdir()) == [folder.name]  # nothing half-built left


def test_flipped_bytes_are_never_served_and_the_store_is_rebuilt(files, tmp_path):
    cache = tmp_path / "cache"
    first = decode_to_store(files, DecodeSettings(48), cache)
    row_bytes = 3 * 48 * 48
    with open(first.store / "images.u8", "r+b") as fh:  # three inverted rows and a flipped byte in another
        for row in (0, 2, 5):
            fh.seek(row * row_bytes)
            data = fh.read(row_bytes)
            fh.seek(row * row_bytes)
            fh.write(bytes(255 - b for b in data))
        fh.seek(4 * row_bytes + 1000)
        byte = fh.read(1)
        fh.seek(4 * row_bytes + 1000)
        fh.write(bytes([byte[0] ^ 0x10]))
    opened = decode_to_store(files, DecodeSettings(48), cache)  # the structure is whole: opens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert same_as_direct(opened, files)  # each bad row decoded again from its file, proven, served
    damaged = [str(w.message) for w in caught if "damaged" in str(w.message)]
    assert len(damaged) == 1 and str(first.store) in damaged[0]  # one warning naming the store
    assert (first.store / "DAMAGED").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = decode_to_store(files, DecodeSettings(48), cache)
    assert any("broken" in str(w.message) and "marked damaged" in str(w.message) for w in caught)
    assert not (rebuilt.store / "DAMAGED").exists() and same_as_direct(rebuilt, files)
    raw = np.memmap(rebuilt.store / "images.u8", np.uint8, "r")
    assert all(
        np.array_equal(raw[i * row_bytes : (i + 1) * row_bytes].reshape(3, 48, 48), rebuilt.images.data[i])
        for i in range(len(rebuilt.paths))
    )


def test_a_bad_row_whose_file_changed_is_an_error_naming_it(files, tmp_path):
    from chestxray.errors import CacheError

    cache = tmp_path / "cache"
    decoded = decode_to_store(files, DecodeSettings(48), cache)
    with open(decoded.store / "images.u8", "r+b") as fh:
        fh.write(b"\x00" * 100)  # row 0
    row0 = decoded.images.store.sources[0]
    shutil.copy(files[4], row0)  # its file now has other content: the row cannot be proven any more
    with pytest.raises(CacheError, match=rf"row 0 \({re.escape(row0)}\) fails its checksum .*file has changed"):
        decoded.images[int(np.flatnonzero(decoded.images.rows == 0)[0])]


def test_an_image_rewritten_in_place_at_the_same_size_is_decoded_again(tmp_path):
    """The pointer remembers size, times and inode: the same size with new pixels must not be served stale."""
    import cv2

    folder = tmp_path / "same"
    folder.mkdir()
    paths = []
    for i in range(3):
        image = np.full((40, 40), 30 * (i + 1), np.uint8)
        paths.append(folder / f"{i}.png")
        cv2.imwrite(str(paths[-1]), image, [cv2.IMWRITE_PNG_COMPRESSION, 0])  # stored: the size ignores content
    cache = tmp_path / "cache"
    first = decode_to_store(paths, DecodeSettings(32), cache)
    size = paths[0].stat().st_size
    cv2.imwrite(str(paths[0]), np.full((40, 40), 250, np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 0])
    assert paths[0].stat().st_size == size
    again = decode_to_store(paths, DecodeSettings(32), cache)
    assert again.store != first.store and again.images[0].min() == 250
    stat = paths[1].stat()  # new content, then the old modification time put back: ctime and inode still differ
    cv2.imwrite(str(paths[1]), np.full((40, 40), 5, np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 0])
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert decode_to_store(paths, DecodeSettings(32), cache).images[1].max() == 5


def test_no_room_on_the_cache_disk_falls_back_to_memory_or_names_the_folder_and_bytes(files, tmp_path, monkeypatch):
    from chestxray.errors import CacheError

    cache = tmp_path / "cache"
    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.warns(UserWarning, match=rf"no room for a {9 * 3 * 48 * 48:,}-byte decoded-image store in {cache}"):
        decoded = decode_to_store(files, DecodeSettings(48), cache)
    assert decoded.store is None and same_as_direct(decoded, files)  # decoded in memory instead
    monkeypatch.setattr(store_module, "_memory_available", lambda: 0)
    with pytest.raises(CacheError, match=rf"{cache} .*has no room for {9 * 3 * 48 * 48:,} bytes"):
        decode_to_store(files, DecodeSettings(48), cache)
    assert not list((cache / "stores").glob(".building-*"))


def test_a_full_disk_during_allocation_is_a_clear_error_not_a_bus_error(files, tmp_path):
    """A file-size limit makes the allocation fail as a full disk does (ENOSPC / EFBIG): no SIGBUS, nothing left."""
    cache = tmp_path / "cache"
    script = (
        "import resource, signal, sys, json, pathlib\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "from chestxray.data.store import decode_to_store, DecodeSettings\n"
        "from chestxray.errors import CacheError\n"
        "paths = [pathlib.Path(p) for p in json.loads(sys.argv[1])]\n"
        "try:\n"
        "    decode_to_store(paths, DecodeSettings(48), sys.argv[2], fallback=False)\n"
        "except CacheError as err:\n"
        "    print('CacheError:', err)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps([str(p) for p in files]), str(cache)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"CacheError: the decoded-image cache folder {cache}" in result.stdout and "no room" in result.stdout
    assert not list((cache / "stores").glob(".building-*"))


def test_a_build_killed_with_sigkill_leaves_a_folder_the_next_build_removes(files, tmp_path):
    cache = tmp_path / "cache"
    script = (
        "import sys, json, pathlib, time\n"
        "import chestxray.data.store as s\n"
        "slow = s.model_view\n"
        "s.model_view = lambda *a, **k: (time.sleep(0.5), slow(*a, **k))[1]\n"
        "paths = [pathlib.Path(p) for p in json.loads(sys.argv[1])]\n"
        "s.decode_to_store(paths, s.DecodeSettings(48), sys.argv[2], workers=1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps([str(p) for p in files]), str(cache)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not list((cache / "stores").glob(".building-*/images.u8")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    [left] = list((cache / "stores").glob(".building-*"))
    live = cache / "stores" / f".building-{os.getpid()}-live"  # a build in progress in a live process: kept
    live.mkdir()
    holder = open(live / ".lock", "w")
    import fcntl

    fcntl.flock(holder, fcntl.LOCK_EX)
    decoded = decode_to_store(files, DecodeSettings(48), cache)
    assert not left.exists() and live.exists() and same_as_direct(decoded, files)
    holder.close()


def test_a_cache_folder_that_cannot_be_written_is_one_clear_error(files, tmp_path):
    from chestxray.errors import CacheError

    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(CacheError, match=rf"cannot write the decoded-image cache folder {blocker / 'cache'}"):
        decode_to_store(files, DecodeSettings(48), blocker / "cache")


def test_cached_perceptual_hashes_are_proven_before_use(files, tmp_path):
    from chestxray.data.duplicates import hash_decoded, hash_files

    decoded = decode_to_store([p for p in files if p.name != "bad.jpg"], DecodeSettings(48), tmp_path / "cache")
    first, ok = hash_decoded(decoded)
    cached = decoded.store / "phash.u8"
    assert ok.all() and cached.read_bytes() == first.tobytes()
    cached.write_bytes(bytes(len(cached.read_bytes())))  # zeros: a wrong cache
    again, _ = hash_decoded(decoded)
    assert np.array_equal(again, hash_files(decoded.paths)[0]) and np.array_equal(again, first)
