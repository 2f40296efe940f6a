"""The decoded-image store: bit-identical to a direct decode, keyed by content and settings, shared, reused."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from chestxray import store as store_module
from chestxray.images import ImageLimits, load_image
from chestxray.store import DecodeSettings, choose_store, decode_in_memory, decode_to_store
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
    assert [e.path for e in decoded.bad] == [str(files[3])] and "not a JPEG or PNG" in decoded.bad[0].reason
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
        "from chestxray.store import decode_to_store, DecodeSettings\n"
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
