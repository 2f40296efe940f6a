"""python train.py resume=RUN_DIR [overrides]: continue an earlier run in its own folder, with its own settings.

The run's settings are its command-line overrides (`.hydra/overrides.yaml`), replayed through Hydra's compose
with the new command line's overrides after them (so `trainer.max_epochs=20` wins), in the same folder (checkpoints,
the same TensorBoard run, train.log appended), from its `checkpoints/last.ckpt`. The merged overrides are written
back, so a second resume replays everything again.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from chestxray.errors import ResumeError
from chestxray.models.checkpoints import RESUME_KEYS, mismatches, read_checkpoint
from chestxray.runtime.files import atomic_write
from chestxray.runtime.folders import job_of
from chestxray.settings import check_choices, hydra_choices


def _setting(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_fits(checkpoint: dict, cfg: DictConfig, setting: str) -> None:
    """A checkpoint continues only a model with the same classes, image size, normalisation and backbone."""
    wanted = {key: (config_key, _setting(cfg, config_key)) for key, config_key in RESUME_KEYS.items()}
    differ = mismatches(checkpoint["hyper_parameters"], wanted)
    if differ:
        raise ResumeError(
            f"{setting}: {'; '.join(differ)}. Continuing would make the checkpoint meaningless: "
            "drop the override, or start a new run."
        )


def _current_overrides() -> list[str]:
    """This command line's overrides, without resume= and Hydra's own settings."""
    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not _key(o).startswith(("resume", "hydra."))]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(saved: list[str], current: list[str]) -> list[str]:
    """The saved overrides with the new ones replacing those of the same key; an addition (+key=) that the
    saved settings may already hold becomes a forced one (++key=)."""
    new_keys = {_key(o) for o in current}
    merged = [o for o in saved if _key(o) not in new_keys and _key(o) != "resume"]
    for override in current:
        merged.append("+" + override if override.startswith("+") and not override.startswith("++") else override)
    return merged


def resume_config(cfg: DictConfig) -> DictConfig:
    """The run's own config with this command line's overrides on top, its folder, and its last.ckpt."""
    run = Path(cfg.resume).resolve()
    saved_file = run / ".hydra" / "overrides.yaml"
    last = run / "checkpoints" / "last.ckpt"
    if not saved_file.is_file():
        raise ResumeError(f"resume={cfg.resume}: not the folder of a train.py run (no .hydra/overrides.yaml in it)")
    job = job_of(run)
    if job not in ("train", None):
        raise ResumeError(f"resume={cfg.resume}: the folder of a run of {job}.py, not of train.py")
    if not last.is_file():
        raise ResumeError(
            f"resume={cfg.resume}: no checkpoints/last.ckpt: the run stopped before its first epoch ended, "
            "so there is nothing to continue; start it again"
        )
    saved = yaml.safe_load(saved_file.read_text()) or []
    merged = merge_overrides(saved, _current_overrides())
    if not GlobalHydra.instance().is_initialized():
        raise ResumeError("resume= works from the command line (python train.py resume=RUN_DIR)")
    overrides = [*merged, f"paths.output_dir={run}", f"ckpt_path={last}"]
    resumed = compose("train", overrides=overrides, return_hydra_config=True)
    _, conf_dir = hydra_choices()
    if conf_dir is not None:  # the replayed settings must not contradict an experiment either
        check_choices(resumed.hydra.runtime.choices, conf_dir)
    with open_dict(resumed):
        del resumed["hydra"]
    check_fits(read_checkpoint(last, "resume"), resumed, f"resume={cfg.resume}")  # before anything is written
    if rank_zero_only.rank == 0:
        atomic_write(run / ".hydra" / "overrides.yaml", yaml.safe_dump(merged))
        atomic_write(run / ".hydra" / "config.yaml", OmegaConf.to_yaml(resumed))
    return resumed
