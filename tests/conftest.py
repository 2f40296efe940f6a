"""Shared fixtures: the real dataset where it exists (a generated one where not), Hydra configs composed for tiny
CPU runs, and trained checkpoints.

Two tiers: `python -m pytest -m "not slow" -n auto` (about two minutes on 2 cores with pytest-xdist's workers, one
torch thread each: unit tests, config composition, a fast_dev_run
through train, test and report, predict in-process on a two-epoch checkpoint) and the whole suite (subprocesses,
trainings that learn, DDP, sweeps, servers).

Tests marked `real_data` need the real Kaggle dataset (../shared/data/covid19-image-dataset or $CHESTXRAY_DATA):
they are skipped, with the reason, on a clone without it, and CI (CHESTXRAY_REQUIRE_REAL_DATA=1) fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
REAL_DATA = Path(os.environ.get("CHESTXRAY_DATA", ROOT.parent / "shared" / "data" / "covid19-image-dataset")).resolve()
HAVE_REAL_DATA = (REAL_DATA / "train").is_dir()
CLASSES = ["Normal", "Covid", "Viral Pneumonia"]

# Tiny but real: every image of a dataset is decoded, the model is the full VGG19 at 32 px, two short epochs.
TINY = [
    "debug=limit",
    "model.pretrained=false",
    "data.image_size=32",
    "data.check_leakage=false",
    "trainer.precision=32-true",  # the same numbers on every CPU (the default is bf16 on bf16 CPUs: tested alone)
]
# A model that learns the generated classes in about half a minute, deterministically (experiment=quickstart at
# 32 px: VGG19 from scratch needs Adam here).
LEARNS = [
    "experiment=quickstart",
    "data.image_size=32",
    "trainer.max_epochs=10",
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    "trainer.precision=32-true",
    "callbacks.progress_bar.refresh_rate=0",
    "report.bootstrap_resamples=200",
]


def pytest_configure(config):
    # Decoded-image stores of the tests go to a folder of their own, shared by the tests' subprocesses.
    config.chestxray_cache = os.environ["CHESTXRAY_CACHE"] = tempfile.mkdtemp(prefix="chestxray-test-cache-")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores, one thread each
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"  # and each test's subprocesses
        torch.set_num_threads(1)


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "chestxray_cache", None) or "/nonexistent", ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if HAVE_REAL_DATA:
        return
    if os.environ.get("CHESTXRAY_REQUIRE_REAL_DATA"):
        raise pytest.UsageError(f"CHESTXRAY_REQUIRE_REAL_DATA is set but the real dataset is missing: {REAL_DATA}")
    skip = pytest.mark.skip(reason=f"needs the real dataset at {REAL_DATA} (set CHESTXRAY_DATA to its folder)")
    for item in items:
        if "real_data" in item.keywords:
            item.add_marker(skip)


def run_script(*args: str, timeout: int = 600, ok: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """python <args> in the checkout; with ok, it must exit 0."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def signal_when(cmd: list[str], ready, signum: int, settle: float = 0.5) -> tuple[subprocess.Popen, str, float]:
    """Start cmd in ROOT, wait until ready() (at most 5 minutes), send signum; (process, stderr, seconds to exit)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ready() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(settle)
    assert proc.poll() is None, "the process ended before it could be stopped mid-way"
    os.kill(proc.pid, signum)
    start = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    return proc, stderr, time.monotonic() - start


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def train_config(output_dir: Path, data: Path, *overrides: str) -> DictConfig:
    return compose_config("train", [*TINY, f"data.data_dir={data}", f"paths.output_dir={output_dir}", *overrides])


def predict_config(output_dir: Path, ckpt, inputs, *overrides: str) -> DictConfig:
    ckpt = f"[{','.join(map(str, ckpt))}]" if isinstance(ckpt, list | tuple) else str(ckpt)
    inputs = f"[{','.join(map(str, inputs))}]" if isinstance(inputs, list | tuple) else str(inputs)
    return compose_config(
        "predict",
        [
            f"ckpt={ckpt}",
            f"inputs={inputs}",
            f"paths.output_dir={output_dir}",
            "trainer.accelerator=cpu",
            "decode_workers=0",
            "report.bootstrap_resamples=50",
            *overrides,
        ],
    )


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A folder that make(folder) fills, made once per test session: pytest-xdist's workers share it (the first to
    ask makes it under a file lock, the others wait and read it), as pytest-xdist's documentation recommends for
    session data. Tests only read it."""
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent  # the session's folder, above each worker's own
    folder = shared / f"shared-{name}"
    with FileLock(str(shared / f"shared-{name}.lock")):
        if not (folder / ".done").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that died half-way
            folder.mkdir()
            make(folder)
            (folder / ".done").touch()
    return folder


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A generated dataset in the real layout and kinds of files: 30 train and 12 test images per class, and 3
    more Covid test images that copy train images (leakage)."""
    from chestxray.synthetic import make_dataset

    def make(root: Path) -> None:
        make_dataset(root / "data", {"train": 30, "test": 12}, size=96, seed=1, leaks=3)

    return made_once(tmp_path_factory, "synthetic", make) / "data"


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real dataset (tests that use it are marked real_data)."""
    return REAL_DATA


@pytest.fixture(scope="session")
def data_dir(synthetic_dir) -> Path:
    """The real dataset where it exists, else the generated one: for tests that hold on either."""
    return REAL_DATA if HAVE_REAL_DATA else synthetic_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synthetic_dir) -> dict:
    """Two short epochs (debug=limit) on the generated data, with the leakage check: checkpoints and reports to
    test the plumbing on (the model has not learned much)."""
    from chestxray.training.fit import train

    def config(out: Path) -> DictConfig:
        # two loggers: the TensorBoard tests and the CSV logger's read the same run
        overrides = ["data.check_leakage=true", "data.store=disk", "logger=[tensorboard,csv]"]
        return train_config(out, synthetic_dir, *overrides)

    def make(root: Path) -> None:
        (root / "value.json").write_text(json.dumps(train(config(root / "run"))))

    root = made_once(tmp_path_factory, "tiny", make)
    out, value = root / "run", json.loads((root / "value.json").read_text())
    ckpt = out / "checkpoints" / "best.ckpt"
    return {"cfg": config(out), "dir": out, "value": value, "data": synthetic_dir, "ckpt": ckpt}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, synthetic_dir) -> dict:
    """One training run of a model that has learned (test accuracy well above chance), shared by the slow tests."""
    from chestxray.training.fit import train

    out = tmp_path_factory.mktemp("run")
    overrides = [*LEARNS, f"data.data_dir={synthetic_dir}", f"paths.output_dir={out}", "data.store=disk"]
    cfg = compose_config("train", overrides)
    value = train(cfg)
    return {"cfg": cfg, "dir": out, "value": value, "data": synthetic_dir, "ckpt": out / "checkpoints" / "best.ckpt"}


def run_copy(tiny_run, tmp_path, with_settings: bool, **data) -> Path:
    """A copy of the tiny checkpoint, with the data settings training saved in it (changed by `data`, e.g.
    drop_leaking=True), or without them, as a checkpoint that names no train images."""
    import torch

    checkpoint = torch.load(tiny_run["ckpt"], map_location="cpu", weights_only=True)
    if with_settings:
        checkpoint["datamodule_hyper_parameters"].update(data)
    else:
        del checkpoint["datamodule_hyper_parameters"]
    target = tmp_path / "train-run" / "checkpoints" / "best.ckpt"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target)
    return target
