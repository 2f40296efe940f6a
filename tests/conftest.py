"""Shared fixtures: the real dataset, Hydra configs composed for tiny CPU runs, one trained checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DATA = Path(os.environ.get("CHESTXRAY_DATA", ROOT.parent / "shared" / "data" / "covid19-image-dataset")).resolve()

# Tiny but real: every image of the real dataset is decoded, the model is the full VGG19 at 32 px.
FAST = [
    f"data.data_dir={DATA}",
    "model.pretrained=false",
    "data.image_size=32",
    "data.check_leakage=false",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "callbacks.progress_bar.refresh_rate=0",
]


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def train_config(output_dir: Path, *overrides: str) -> DictConfig:
    return compose_config("train", [*FAST, f"paths.output_dir={output_dir}", *overrides])


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "train").is_dir():
        pytest.fail(f"the real dataset is missing: {DATA} (set CHESTXRAY_DATA)")
    return DATA


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> dict:
    """One tiny training run shared by the tests that need a run folder or a checkpoint."""
    from chestxray.training import train

    out = tmp_path_factory.mktemp("run")
    cfg = train_config(out, "data.check_leakage=true", "trainer.limit_test_batches=null")
    value = train(cfg)
    return {"cfg": cfg, "dir": out, "value": value}
