"""Every config builds: each experiment with each option of each group is composed with Hydra's compose API and its
objects instantiated (no training), or refused in one line; settings out of range are refused before any work."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from chestxray import settings
from chestxray.errors import ConfigError
from chestxray.training.fit import instantiate_callbacks, instantiate_model
from chestxray.training.loggers import instantiate_loggers
from tests.conftest import CONF, ROOT, compose_config, run_script

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONAL = {"scheduler", "debug", "experiment", "hparams_search", "logger"}  # may be null


def options(group: str) -> list[str]:
    names = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    if group == "debug":
        names.remove("default")  # the base of the others, not a choice
    return names + (["none"] if group in OPTIONAL else [])  # none: the group left out (~group)


EXPERIMENTS = [e for e in options("experiment")]
COMBINATIONS = [(e, g, o) for e in EXPERIMENTS for g in GROUPS if g != "experiment" for o in options(g)]


def test_the_configs_name_the_metrics_the_module_logs():
    from chestxray.evaluation import metrics

    cfg = compose_config("train", ["paths.output_dir=/tmp/unused"])
    assert cfg.callbacks.model_checkpoint.monitor == metrics.VAL_ACC and cfg.optimized_metric == metrics.BEST
    assert {metrics.VAL_ACC, metrics.BEST, *metrics.HISTORY} <= set(metrics.logged_metrics(["test"]))


def test_every_group_and_experiment_is_covered():
    assert {"notebook", "gpu_fast", "quickstart", "none"} <= set(EXPERIMENTS)
    assert {"optimizer", "scheduler", "trainer", "logger", "debug", "callbacks", "data", "model"} <= set(GROUPS)
    assert {"tensorboard", "csv", "mlflow", "many", "none"} == set(options("logger"))
    assert {"fdr", "limit", "overfit", "profiler", "none"} == set(options("debug"))


def listed_choices() -> list[tuple[str, str]]:
    """(file, override) for each choice a defaults line's comment lists: `- logger: tensorboard # csv | many; ~logger
    for none` gives logger=csv, logger=many and ~logger."""
    found = []
    for path in sorted(CONF.glob("*.yaml")):
        for line in path.read_text().splitlines():
            match = re.fullmatch(r"\s*- (\w+): \S+ # (.*)", line)
            if not match or "|" not in match[2]:
                continue
            group, comment = match.groups()
            options = re.search(r"[\w~]+(?: \| [\w~]+)+", comment)[0].split(" | ")
            found += [(path.name, o if o.startswith("~") else f"{group}={o}") for o in options]
            found += [(path.name, drop) for drop in re.findall(r"~\w+", comment) if drop not in options]
    return found


def test_every_choice_a_config_comment_lists_composes():
    """The comments are what users copy: `logger=null` there would fail in Hydra (`~logger` drops a group)."""
    listed = listed_choices()
    assert {("train.yaml", "logger=mlflow"), ("train.yaml", "~logger"), ("train.yaml", "debug=fdr")} <= set(listed)
    for page, override in listed:
        cfg = compose_config_with_hydra([override, "paths.output_dir=/tmp/unused"], page.removesuffix(".yaml"))
        group = override.lstrip("~").split("=")[0]
        assert (cfg.hydra.runtime.choices.get(group) is None) == override.startswith("~"), (page, override)


def _build(cfg, built_models: dict) -> None:
    """Instantiate what a run builds, without a GPU: data module, model, its optimizer and scheduler, callbacks,
    loggers, Trainer (on the CPU, one process, when no GPU is here)."""
    instantiate(cfg.data)
    network = OmegaConf.to_container(cfg.model, resolve=True)
    optimizer_cfg, scheduler_cfg = network.pop("optimizer"), network.pop("scheduler")
    key = json.dumps(network, sort_keys=True)
    if key not in built_models:  # building a network takes a second: once per distinct network config
        built_models[key] = instantiate_model(cfg)  # as train.py builds it (model.init_from is not the model's)
    model = built_models[key]
    # this combination's own optimizer and scheduler (Adam(momentum=...) fails here), on the model's parameters
    model.optimizer_factory = instantiate(optimizer_cfg)
    model.scheduler_factory = instantiate(scheduler_cfg) if scheduler_cfg else None
    optimizers = model.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert type(optimizer).__name__ == optimizer_cfg["_target_"].rsplit(".", 1)[1]
    if scheduler_cfg:
        assert type(optimizers["lr_scheduler"]["scheduler"]).__name__ == scheduler_cfg["_target_"].rsplit(".", 1)[1]
    instantiate_callbacks(cfg.callbacks)
    instantiate_loggers(cfg.get("logger"), cfg.paths.output_dir)
    trainer_cfg = cfg.trainer
    if not torch.cuda.is_available():
        trainer_cfg = OmegaConf.merge(trainer_cfg, {"accelerator": "cpu", "devices": 1, "strategy": "auto"})
    instantiate(trainer_cfg, logger=False, enable_progress_bar=False)


def _common(tmp_path: Path) -> list[str]:
    """The overrides every composition of the two tests below takes."""
    return [
        f"paths.output_dir={tmp_path / 'run'}",
        f"data.data_dir={tmp_path}",
        "model.pretrained=false",
        "model.compile=false",  # compiling is lazy anyway; keep the test free of inductor
    ]


def _check_and_build(cfg, built_models: dict) -> None:
    """The settings' checks of a composed config, then what a run builds from it (_build)."""
    with open_dict(cfg):
        del cfg["hydra"]
    settings.check(cfg, settings.TRAIN_RULES)
    _build(cfg, built_models)


def test_every_experiment_and_every_option_builds(tmp_path, monkeypatch):
    """The fast tier's share of the test below: each experiment as it is, and each option of each group once, on no
    experiment (a third of the compositions)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    built_models: dict = {}
    overrides = [["~experiment" if e == "none" else f"experiment={e}"] for e in EXPERIMENTS]
    overrides += [["~experiment", f"~{g}" if o == "none" else f"{g}={o}"] for e, g, o in COMBINATIONS if e == "none"]
    for chosen in overrides:
        cfg = compose_config_with_hydra([*chosen, *_common(tmp_path)])
        settings.check_choices(cfg.hydra.runtime.choices, CONF)
        _check_and_build(cfg, built_models)
    assert len(overrides) > 25  # each experiment, and each option of each group (every one built above)


@pytest.mark.slow  # about 80 compositions, 15 s on 2 cores: the test above covers each option once
def test_every_experiment_builds_with_every_option_of_every_group(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    built_models: dict = {}
    refused, built = [], 0
    common = _common(tmp_path)

    def check_and_build(cfg) -> None:
        nonlocal built
        _check_and_build(cfg, built_models)
        built += 1

    defaults = {}  # each experiment's own choice per group: that combination is the experiment as it is, built once
    for experiment in EXPERIMENTS:
        chosen = "~experiment" if experiment == "none" else f"experiment={experiment}"
        cfg = compose_config_with_hydra([chosen, *common])
        defaults[experiment] = {g: c if c is not None else "none" for g, c in cfg.hydra.runtime.choices.items()}
        check_and_build(cfg)
    for experiment, group, option in COMBINATIONS:
        if defaults[experiment].get(group) == option:
            continue  # the same config as the experiment's own, built above
        overrides = [
            "~experiment" if experiment == "none" else f"experiment={experiment}",
            f"~{group}" if option == "none" else f"{group}={option}",
            *common,
        ]
        cfg = compose_config_with_hydra(overrides)
        try:
            settings.check_choices(cfg.hydra.runtime.choices, CONF)
        except ConfigError as err:
            shown = f"~{group}" if option == "none" else f"{group}={option}"  # as it is typed
            assert str(err).startswith(f"{shown} contradicts experiment={experiment}"), str(err)
            refused.append((experiment, group, option))
            continue
        check_and_build(cfg)
    assert built + len(refused) > 70  # every distinct combination, not only the experiments' own
    # only what an experiment pins is refused, and its own pins compose
    assert ("notebook", "optimizer", "adam") in refused and ("gpu_fast", "trainer", "cpu") in refused
    assert all(g in settings.experiment_pins(CONF, e) for e, g, _ in refused)


def compose_config_with_hydra(overrides, name: str = "train"):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=True)


def test_experiments_pin_the_groups_whose_settings_they_change():
    for experiment in [e for e in EXPERIMENTS if e != "none"]:
        text = yaml_keys(CONF / "experiment" / f"{experiment}.yaml")
        pins = settings.experiment_pins(CONF, experiment)
        # a group whose options have different keys: setting one of its keys assumes an option
        for group in ("optimizer", "scheduler"):
            if group in text:
                assert group in pins, f"experiment={experiment} sets {group} keys without pinning {group}"
    assert settings.experiment_pins(CONF, "notebook")["optimizer"] == "sgd"
    assert settings.experiment_pins(CONF, "gpu_fast") == {"optimizer": "sgd", "trainer": "gpu"}
    assert settings.experiment_pins(CONF, "quickstart")["optimizer"] == "adam"
    quick = compose_config("train", ["experiment=quickstart"])
    assert quick.optimizer._target_ == "torch.optim.Adam" and "momentum" not in quick.optimizer


def yaml_keys(path: Path) -> set[str]:
    import yaml

    return set((yaml.safe_load(path.read_text()) or {}).keys())


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.image_size=-1", "data.image_size=-1: must be an integer at least 32"),
        ("data.image_size=16", "data.image_size=16: must be an integer at least 32"),
        ("data.batch_size=0", "data.batch_size=0: must be an integer at least 1"),
        ("data.batch_size=2.5", "data.batch_size=2.5: must be an integer at least 1"),
        ("optimizer.lr=abc", "optimizer.lr=abc: must be a number greater than 0"),
        ("optimizer.lr=0", "optimizer.lr=0: must be a number greater than 0"),
        ("optimizer.momentum=1.5", "optimizer.momentum=1.5: must be a number at least 0 and less than 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0: must be an integer at least 1"),
        ("data.val_fraction=1", "data.val_fraction=1: must be a number at least 0 and less than 1"),
        ("data.num_workers=-2", "data.num_workers=-2: must be an integer at least 0 (or auto)"),
        ("data.store=ram", "data.store=ram: must be one of auto, memory, disk"),
        ("model.backbone=alexnet", "model.backbone=alexnet: must be one of vgg19, resnet50"),
        ("model.dropout=1", "model.dropout=1: must be a number at least 0 and less than 1"),
        ("trainer.limit_train_batches=1.5", "trainer.limit_train_batches=1.5: a fraction must be at most 1.0"),
        ("data.fold=5", "data.fold=5: must be between 0 and data.folds-1=4"),
        ("report.bootstrap_resamples=-1", "report.bootstrap_resamples=-1: must be an integer at least 0"),
        ("data.leakage_threshold=300", "data.leakage_threshold=300: must be an integer at least 0 and at most 256"),
        ("trainer.limit_val_batches=0", "trainer.limit_val_batches=0: no validation, but optimized_metric=val/acc"),
        ("trainer.check_val_every_n_epoch=20", "trainer.check_val_every_n_epoch=20 is more than trainer.max_epochs=10"),
    ],
)
def test_a_setting_out_of_range_is_one_line_naming_it(override, message):
    cfg = compose_config("train", [override, "paths.output_dir=/tmp/unused"])
    with pytest.raises(ConfigError) as err:
        settings.check(cfg, settings.TRAIN_RULES)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_predict_refuses_the_data_settings_it_does_not_use():
    for override in ("data.image_size=64", "data.num_workers=8", "+data.augment=true"):
        with pytest.raises(ConfigError, match=rf"^{re.escape(override)}: predict.py does not use data\."):
            settings.check_predict_overrides([override])
    settings.check_predict_overrides(["data.eval_batch_size=4", "data.max_pixels=1000", "runtime=onnx", "data=x"])


def test_the_defaults_and_every_predict_setting_pass():
    settings.check(compose_config("train", ["paths.output_dir=/tmp/unused"]), settings.TRAIN_RULES)
    predict = compose_config("predict", ["ckpt=a.ckpt", "inputs=x", "paths.output_dir=/tmp/unused"])
    settings.check(predict, settings.PREDICT_RULES)
    bad = compose_config("predict", ["ckpt=a", "inputs=x", "paths.output_dir=/tmp/u", "decode_workers=-1"])
    with pytest.raises(ConfigError, match=r"decode_workers=-1: must be an integer at least 0 \(or auto\)"):
        settings.check(bad, settings.PREDICT_RULES)


def _package_imports(stage_inits: bool = False) -> dict[str, set[str]]:
    """chestxray's modules and the chestxray modules each imports, at module level or inside a function. With
    stage_inits, also its stage's __init__, which importing it runs first (chestxray.data.images runs
    chestxray/data/__init__.py): what the layering must see, though not a cycle (a stage's __init__ may re-export
    its own modules)."""
    package = ROOT / "chestxray"
    names = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in package.rglob("*.py")
    }
    graph = {}
    for name, path in names.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chestxray"):
                for alias in node.names:  # from chestxray.evaluation import metrics: the module metrics
                    deps.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in names else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("chestxray"))
        if stage_inits:
            deps |= {".".join(name.split(".")[:k]) for k in range(2, name.count(".") + 1)}
        graph[name] = {d for d in deps if d in names and d not in (name, "chestxray")}
    return graph


def test_no_import_cycle_in_the_package():
    """No chestxray module imports, even lazily inside a function, a module that imports it back (directly or round
    a longer loop): the layout's layers (runtime <- data <- models <- evaluation <- training, inference) hold."""
    graph = _package_imports()
    assert "chestxray.runtime.interrupt" in graph["chestxray.runtime.entry"]  # the walk sees the real imports

    def visit(node, stack):
        for nxt in graph.get(node, ()):
            assert nxt not in stack, f"import cycle: {' -> '.join([*stack, nxt])}"
            visit(nxt, [*stack, nxt])

    for module in graph:
        visit(module, [module])


# Each stage imports only the stages before it: a module may use what lies down the pipeline, never what lies up it.
LAYERS = ("runtime", "data", "evaluation", "models", ("training", "inference"), "serving")


def _layer(module: str) -> int | None:
    """A module's place in LAYERS (a stage's __init__ included); None for the package's top-level modules (errors,
    settings and the commands) and the package itself."""
    parts = module.split(".")
    stage = parts[1] if len(parts) >= 2 else None
    for rank, layer in enumerate(LAYERS):
        if stage == layer or (isinstance(layer, tuple) and stage in layer):
            return rank
    return None


def _reachable(graph: dict[str, set[str]], module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_layout_follows_the_pipeline():
    """Each stage is a subpackage; the commands (python -m chestxray.<tool>) and the settings stay at the top."""
    graph = _package_imports()
    stages = {name.split(".")[1] for name in graph if name.count(".") >= 2}
    assert stages == {"data", "models", "evaluation", "training", "inference", "serving", "runtime"}
    top = sorted(name.split(".")[1] for name in graph if name.count(".") == 1 and name.split(".")[1] not in stages)
    assert top == ["audit", "errors", "export", "robustness", "settings", "summary", "synthetic"]


def test_nothing_imports_up_the_pipeline():
    """runtime imports no other stage, data only runtime, evaluation neither models, training, inference nor serving:
    directly, lazily inside a function, or through a top-level module (settings imports the models' registries, so a
    stage below models may not import settings either), or in a stage's __init__. chestxray.errors, the one exception
    type per fault, is below every stage."""
    graph = _package_imports(stage_inits=True)
    assert "chestxray.models.ood" in graph["chestxray.settings"]  # the walk sees through a top-level module
    assert "chestxray.data" in graph["chestxray.data.images"]  # and a stage's __init__, which each of its modules runs
    wrong = []
    for module in graph:
        rank = _layer(module)
        if rank is None:
            continue
        for dep in sorted(_reachable(graph, module)):
            dep_rank = _layer(dep)  # a top-level module passes: the stages it reaches are in the walk as well
            if dep_rank is not None and dep_rank > rank:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports up the pipeline:\n" + "\n".join(wrong)


@pytest.mark.slow  # a subprocess or a whole export: the full suite
def test_each_entry_point_has_its_own_help():
    train = run_script("train.py", "--help").stdout
    assert train.startswith("python train.py [group=option ...]") and "model.backbone" in train
    assert (
        "fdr, limit, overfit, profiler" in train and "experiment: gpu_fast, notebook, quickstart, scratch224" in train
    )
    assert len(train.splitlines()) < 60 and "_target_" not in train  # a page, not the whole config
    predict = run_script("predict.py", "--help").stdout
    assert predict.startswith("python predict.py ckpt=CHECKPOINT inputs=IMAGES") and "runtime" in predict
    assert "optimizer" not in predict and "experiment" not in predict  # not the training groups
    export = subprocess.run(
        [sys.executable, "-m", "chestxray.export", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert export.returncode == 0 and export.stdout.startswith("usage: python -m chestxray.export ckpt=")
    assert re.search(r"format=\s+onnx", export.stdout)
    bench = run_script("-m", "chestxray.robustness", "--help").stdout
    assert bench.startswith("python -m chestxray.robustness ckpt=CHECKPOINT inputs=") and "shifts" in bench
    serve = run_script("serve.py", "--help").stdout
    assert serve.startswith("python serve.py ckpt=CHECKPOINT") and "max_upload_mb" in serve and "token" in serve


def test_trainer_cpu_trains_in_bf16_where_the_cpu_computes_it_natively(tmp_path, monkeypatch):
    """bf16-mixed with AMX or AVX-512 BF16 (native bf16 arithmetic), fp32 where bf16 would be emulated (AVX2 only)
    and on a Sapphire Rapids-class core (AVX512-FP16) that shows no AMX, whose AVX-512 BF16 kernels are slower than
    its fp32 ones (docs/benchmarks.md)."""
    from chestxray import auto_precision, cpu_precision

    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n")
    epyc = tmp_path / "epyc"
    epyc.write_text("processor\t: 0\nflags\t\t: fpu avx avx2 fma\n")
    bf16_without_amx = tmp_path / "zen4"  # AVX-512 BF16 instructions, no AMX tiles: still native bf16
    bf16_without_amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    avx512_only = tmp_path / "skylake"  # AVX-512 without its BF16 extension: bf16 emulated
    avx512_only.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    hidden_amx = tmp_path / "spr-vm"  # a Sapphire Rapids core whose kernel or hypervisor hides AMX
    hidden_amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_fp16 avx512_vnni\n")
    assert cpu_precision(str(amx)) == "bf16-mixed" and cpu_precision(str(epyc)) == "32-true"
    assert cpu_precision(str(bf16_without_amx)) == "bf16-mixed" and cpu_precision(str(avx512_only)) == "32-true"
    assert cpu_precision(str(hidden_amx)) == "32-true" and cpu_precision(str(tmp_path / "none")) == "32-true"
    amx.write_text(amx.read_text().replace("avx512_bf16", "avx512_bf16 avx512_fp16"))  # Sapphire Rapids with AMX
    assert cpu_precision(str(amx)) == "bf16-mixed"
    cfg = compose_config("train", ["trainer=cpu", "paths.output_dir=/tmp/unused"])
    assert cfg.trainer.precision == cpu_precision() and cfg.trainer.accelerator == "cpu"
    # the plain command: on a machine without a GPU, the CPU's fast path as trainer=cpu; on a GPU, fp32
    assert compose_config("train", ["paths.output_dir=/tmp/unused"]).trainer.precision == cpu_precision()
    assert auto_precision("cpu", str(amx)) == auto_precision("auto", str(amx)) == "bf16-mixed"
    assert auto_precision("gpu", str(amx)) == "32-true" and auto_precision("auto", str(epyc)) == "32-true"
    assert auto_precision("cpu", str(bf16_without_amx)) == "bf16-mixed"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert auto_precision("auto", str(amx)) == "32-true"
    assert compose_config("train", ["trainer=gpu", "paths.output_dir=/tmp/unused"]).trainer.precision == "32-true"


def test_every_precision_lightning_takes_is_accepted():
    for value in ("32", "bf16", "16-mixed", "bf16-mixed", "32-true", "64"):
        settings.check(
            compose_config("train", [f"trainer.precision={value}", "paths.output_dir=/x"]), settings.TRAIN_RULES
        )
    with pytest.raises(ConfigError, match=r"trainer.precision=8: must be one of"):
        settings.check(compose_config("train", ["trainer.precision=8", "paths.output_dir=/x"]), settings.TRAIN_RULES)
