"""The range of every numeric (and every closed-choice) setting, checked when a config is composed, before any work:
a setting out of range is one line naming it and its value (ConfigError, exit 2), not a traceback from deep inside
NumPy, the optimizer or Lightning after the images were decoded.

One table for train.py and predict.py; a key that is absent from the config (an optimizer without momentum, no
scheduler) is not checked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from chestxray.data.preprocess import PREPROCESS
from chestxray.errors import ConfigError
from chestxray.models.backbones import BACKBONES, XRV_WEIGHTS
from chestxray.models.ood import DETECTORS
from chestxray.models.selection import CONFIDENCE_KINDS


def _lightning_precisions() -> tuple[str, ...]:
    """What Lightning's Trainer(precision=...) accepts, as text (Hydra passes 32 as an int, "32-true" as a str)."""
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT

    def flat(t):
        return [v for a in typing.get_args(t) for v in (flat(a) if typing.get_args(a) else [a])]

    return tuple(dict.fromkeys(str(v) for v in flat(_PRECISION_INPUT)))


PRECISIONS = _lightning_precisions()


@dataclass(frozen=True)
class Rule:
    """key: an integer or a number in [low, high] (open at the ends marked), or one of `choices`; `special` values
    (null, "auto", ...) are allowed as well."""

    key: str
    kind: str  # "int", "number", "bool", "choice"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: Sequence[Any] = ()
    special: Sequence[Any] = ()
    as_text: bool = False  # compare str(value) with the choices (Lightning's precision takes 32 and "32")

    def problem(self, value: Any) -> str | None:
        if any(value is s or (value == s and type(value) is type(s)) for s in self.special):
            return None
        if self.kind == "bool":
            return None if isinstance(value, bool) else "must be true or false"
        if self.kind == "choice":
            ok = value in self.choices or (self.as_text and str(value) in self.choices)
            return None if ok else f"must be one of {', '.join(map(str, self.choices))}"
        is_int = isinstance(value, int) and not isinstance(value, bool)
        is_number = is_int or (isinstance(value, float) and math.isfinite(value))
        if self.kind == "int" and not is_int:
            return f"must be {self._range('an integer')}"
        if not is_number:
            return f"must be {self._range('a number')}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return (
            f"must be {self._range('an integer' if self.kind == 'int' else 'a number')}"
            if too_low or too_high
            else None
        )

    def _range(self, what: str) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'greater than' if self.low_open else 'at least'} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'less than' if self.high_open else 'at most'} {self.high:g}")
        extra = f" (or {', '.join('null' if s is None else str(s) for s in self.special)})" if self.special else ""
        return f"{what}{' ' + ' and '.join(parts) if parts else ''}{extra}"


def _int(key, low=None, high=None, special=()):
    return Rule(key, "int", low, high, special=special)


def _number(key, low=None, high=None, low_open=False, high_open=False, special=()):
    return Rule(key, "number", low, high, low_open, high_open, special=special)


def _bool(key, special=()):
    return Rule(key, "bool", special=special)


def _choice(key, choices, special=(), as_text=False):
    return Rule(key, "choice", choices=choices, special=special, as_text=as_text)


# data.image_size: every backbone halves the image five times; below 32 px nothing is left to classify
IMAGE_RULES = [
    _int("data.max_pixels", 1),
    _int("data.min_image_side", 1),
    _int("data.eval_batch_size", 1, special=(None,)),
    _choice("data.lateral", ("flag", "refuse")),
]
TRAIN_RULES = [
    _int("seed", 0, 2**32 - 1),
    *IMAGE_RULES,
    _int("data.image_size", 32, 4096),
    _number("data.val_fraction", 0, 1, high_open=True),
    _int("data.folds", 2),
    _int("data.fold", 0, special=(None,)),
    _int("data.batch_size", 1),
    _int("data.num_workers", 0, special=("auto",)),
    _bool("data.pin_memory", special=(None,)),
    _bool("data.augment"),
    _choice("data.on_bad_file", ("skip", "error")),
    _choice("data.store", ("auto", "memory", "disk")),
    _choice("data.preprocess", PREPROCESS),
    _bool("data.download"),
    _bool("data.check_leakage"),
    _bool("data.drop_leaking"),
    _int("data.leakage_threshold", 0, 256),
    _choice("model.backbone", tuple(BACKBONES)),
    _bool("model.pretrained"),
    _choice("model.xrv_weights", XRV_WEIGHTS),
    _number("model.dropout", 0, 1, high_open=True),
    _int("model.freeze", 0, special=("none", "features")),
    _bool("model.cache_features"),
    _bool("model.channels_last"),
    _choice("model.compile", (False, True, "default", "reduce-overhead", "max-autotune")),
    _bool("model.calibrate"),
    _choice("model.ood.detector", DETECTORS),
    _number("model.ood.pass_rate", 0, 1, low_open=True, high_open=True),
    _number("model.conformal.coverage", 0, 1, low_open=True, high_open=True),
    _choice("model.selective.confidence", CONFIDENCE_KINDS),
    _number("model.selective.risk", 0, 1, low_open=True, high_open=True),
    _number("model.selective.delta", 0, 1, low_open=True, high_open=True),
    _number("optimizer.lr", 0, low_open=True),
    _number("optimizer.weight_decay", 0),
    _number("optimizer.momentum", 0, 1, high_open=True),
    _number("scheduler.eta_min", 0),
    _int("scheduler.T_max", 1),
    _int("scheduler.step_size", 1),
    _number("scheduler.gamma", 0, low_open=True),
    _int("trainer.max_epochs", 1),
    _int("trainer.min_epochs", 0),
    _int("trainer.accumulate_grad_batches", 1),
    _int("trainer.log_every_n_steps", 1),
    _int("trainer.check_val_every_n_epoch", 1),
    _int("trainer.num_sanity_val_steps", -1),
    _choice("trainer.precision", PRECISIONS, as_text=True),
    *[_number(f"trainer.limit_{s}_batches", 0, special=(None,)) for s in ("train", "val", "test")],
    _number("trainer.overfit_batches", 0),
    _int("report.bootstrap_resamples", 0),
    _int("report.seed", 0, 2**32 - 1),
    _int("report.gallery_tiles", 0),
    _int("report.gradcam_tiles", 0),
]
# what predict.py takes from the data group
PREDICT_DATA_KEYS = ("max_pixels", "min_image_side", "lateral", "eval_batch_size")
PREDICT_RULES = [
    *IMAGE_RULES,
    _int("decode_workers", 0, special=("auto",)),
    _int("print_limit", 0),
    _choice("runtime", ("torch", "onnx", "onnx-int8")),
    _bool("gradcam"),
    _choice("precision", PRECISIONS, as_text=True),
    _int("report.bootstrap_resamples", 0),
    _int("report.seed", 0, 2**32 - 1),
    _int("report.gallery_tiles", 0),
    _int("report.gradcam_tiles", 0),
]
ADAPT_RULES = [
    _int("folds", 2),
    _int("min_per_class", 2),
    _bool("finetune"),
    _bool("check_training_copies"),
    _number("finetune_level", 0, 1, low_open=True, high_open=True),
    _int("max_training_images", 0),
    _int("epochs", 1),
    _number("lr", 0, low_open=True),
    _number("weight_decay", 0),
    _int("seed", 0, 2**32 - 1),
    _int("max_pixels", 1),
    _int("min_image_side", 1),
]
ROBUSTNESS_RULES = [
    _int("max_pixels", 1),
    _int("min_image_side", 1),
    _int("batch_size", 1),
    _choice("device", ("auto", "cpu", "cuda")),
    _int("work_side", 32, special=(None,)),
    _bool("leak_free"),
]


def check(cfg: DictConfig, rules: Sequence[Rule]) -> None:
    """Every setting of `rules` that the config has, in range; else one ConfigError naming the first one that is not."""
    for rule in rules:
        if OmegaConf.select(cfg, rule.key, default=_ABSENT) is _ABSENT:
            continue
        value = OmegaConf.select(cfg, rule.key)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        problem = rule.problem(value)
        if problem:
            raise ConfigError(f"{rule.key}={_show(value)}: {problem}")
    limits = [f"trainer.limit_{s}_batches" for s in ("train", "val", "test")]
    for key in limits:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, float) and value > 1:
            raise ConfigError(f"{key}={value}: a fraction must be at most 1.0 (or give a whole number of batches)")
    train_limit = OmegaConf.select(cfg, "trainer.limit_train_batches", default=None)
    if isinstance(train_limit, int | float) and not isinstance(train_limit, bool) and train_limit == 0:
        raise ConfigError(f"trainer.limit_train_batches={train_limit}: no step would train (a fraction or batches)")
    fold, folds = OmegaConf.select(cfg, "data.fold", default=None), OmegaConf.select(cfg, "data.folds", default=None)
    if fold is not None and folds is not None and fold >= folds:
        raise ConfigError(f"data.fold={fold}: must be between 0 and data.folds-1={folds - 1}")
    _check_validation_runs(cfg)


def _check_validation_runs(cfg: DictConfig) -> None:
    """best.ckpt, the temperature and val/acc_best come from validation: settings that would skip every validation
    are refused here, not found after the whole run."""
    needs = [
        f"{key}={value}"
        for key in ("optimized_metric", "callbacks.model_checkpoint.monitor")
        if isinstance(value := OmegaConf.select(cfg, key, default=None), str) and value.startswith("val/")
    ]
    if not needs:
        return
    limit = OmegaConf.select(cfg, "trainer.limit_val_batches", default=None)
    every = OmegaConf.select(cfg, "trainer.check_val_every_n_epoch", default=None)
    epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    if limit is not None and not isinstance(limit, bool) and limit == 0:
        raise ConfigError(f"trainer.limit_val_batches={limit}: no validation, but {' and '.join(needs)} need it")
    if isinstance(every, int) and isinstance(epochs, int) and every > epochs:
        raise ConfigError(
            f"trainer.check_val_every_n_epoch={every} is more than trainer.max_epochs={epochs}: no epoch would "
            f"validate, but {' and '.join(needs)} need it"
        )


def check_predict_overrides(overrides: Sequence[str]) -> None:
    """predict.py composes the data group for its image settings only: the image size, classes and normalisation
    come from the checkpoint and decode_workers sets its loader. Any other data.* setting given to it is one line,
    not silently ignored."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "trainer.precision":
            raise ConfigError(
                f"{override}: predict.py predicts in fp32 (the probabilities of the test report) whatever the trainer "
                "group says; precision=bf16-mixed asks for bf16 autocast"
            )
        if key.startswith("data.") and key.removeprefix("data.") not in PREDICT_DATA_KEYS:
            raise ConfigError(
                f"{override}: predict.py does not use {key} (the checkpoint gives the image size, classes and "
                "normalisation; decode_workers= sets its loader); of the data group it takes "
                + ", ".join(f"data.{k}" for k in PREDICT_DATA_KEYS)
            )


def hydra_overrides() -> list[str]:
    """The overrides of this run's command line (none outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


_ABSENT = object()


def experiment_pins(conf_dir: str | Path, experiment: str) -> dict[str, str | None]:
    """The group options an experiment pins (`- override /group: option` in its defaults list)."""
    path = Path(conf_dir) / "experiment" / f"{experiment}.yaml"
    if not path.is_file():
        return {}
    defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults") or []
    pins = {}
    for entry in defaults:
        if isinstance(entry, dict):
            for key, option in entry.items():
                if key.startswith("override /"):
                    pins[key.removeprefix("override /")] = option
    return pins


def check_choices(choices: Mapping[str, str | None], conf_dir: str | Path) -> None:
    """An experiment runs with the group options it pins (experiment=notebook is SGD with momentum): choosing
    another on the same command line is refused in one line, instead of building, say, Adam(momentum=0.9)."""
    experiment = choices.get("experiment")
    if not experiment:
        return
    for group, pinned in experiment_pins(conf_dir, experiment).items():
        chosen = choices.get(group)
        if chosen != pinned:
            raise ConfigError(
                f"{_choice_typed(group, chosen)} contradicts experiment={experiment}, which runs with "
                f"{_choice_typed(group, pinned)} (its settings assume it): drop one of the two, or copy the "
                "experiment and change it"
            )


def _choice_typed(group: str, choice: str | None) -> str:
    """A group's choice as it is typed on the command line: ~group for none (group=null is not accepted)."""
    return f"~{group}" if choice is None else f"{group}={choice}"


def hydra_choices() -> tuple[dict[str, str | None], Path | None]:
    """This run's group choices and its primary config folder, from Hydra (nothing outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}, None
    runtime = HydraConfig.get().runtime
    main = next((s for s in runtime.config_sources if s.provider == "main" and s.schema == "file"), None)
    return dict(runtime.choices), Path(main.path.removeprefix("file://")) if main else None
