"""The classifier: each backbone under the notebook's head, any number of classes, weights files, freezing,
checkpoints (safe, old, foreign), ensembles, and the non-finite-loss stop."""

import inspect
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torchvision import models

from chestxray.errors import CheckpointError, ConfigError, NonFiniteLossError, WeightsError
from chestxray.models.backbones import BACKBONES, build_network, freeze_stages, get_backbone
from chestxray.models.checkpoints import load_model, load_models
from chestxray.models.classifier import ChestXrayClassifier, Ensemble, Probabilities
from tests.conftest import run_script


def images(n=2, size=32):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)


def test_vgg19_head_is_the_notebooks_and_returns_logits():
    net = build_network("vgg19", 3, pretrained=False)
    assert isinstance(net.avgpool, nn.AdaptiveAvgPool2d)
    kinds = [type(m).__name__ for m in net.classifier]
    assert kinds == ["Flatten", "Linear", "ReLU", "Dropout", "Linear"]
    assert (net.classifier[1].in_features, net.classifier[1].out_features, net.classifier[4].out_features) == (
        512,
        256,
        3,
    )
    model = ChestXrayClassifier(["a", "b", "c"], 32, pretrained=False).eval()
    with torch.inference_mode():
        logits = model(images())
    assert logits.shape == (2, 3) and not torch.allclose(logits.softmax(1).sum(1), logits.sum(1))


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("classes", [["a", "b"], ["a", "b", "c", "d"]])
def test_every_backbone_takes_the_head_and_any_number_of_classes(backbone, classes):
    model = ChestXrayClassifier(classes, 32, backbone=backbone, pretrained=False).eval()
    spec = get_backbone(backbone)
    head = [m for m in spec.head(model.net) if isinstance(m, nn.Linear)]
    assert [(h.in_features, h.out_features) for h in head] == [(spec.width, 256), (256, len(classes))]
    with torch.inference_mode():
        out = model(images(3))
        pooled = spec.trunk(model.net, model.preprocess(images(1)))
    assert out.shape == (3, len(classes)) and pooled.flatten(1).shape == (1, spec.width)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_the_detectors_features_are_the_pooled_ones_then_each_stage_of_the_declared_width(backbone):
    """logits_and_features: the network's own logits, the pooled features first, then every stage's mean output with
    the channels the backbone declares (what the per-stage KNN banks are shaped by)."""
    model = ChestXrayClassifier(["a", "b", "c"], 32, backbone=backbone, pretrained=False).eval()
    spec = get_backbone(backbone)
    widths = [spec.width, *spec.stage_widths]
    ends = [block[-1] for block in spec.blocks(model.net)]
    seen = []
    hooks = [e.register_forward_hook(lambda _m, _a, out: seen.append(out.shape[1])) for e in ends]
    x = images(2)
    with torch.inference_mode():
        logits = model.logits(x)
        raw, features = model.logits_and_features(x)
        pooled = spec.trunk(model.net, model.preprocess(x)).flatten(1)
    for hook in hooks:
        hook.remove()
    assert seen[: len(ends)] == list(spec.stage_widths) and features.shape == (2, sum(widths))
    assert torch.allclose(raw, logits, atol=1e-5) and torch.allclose(features[:, : spec.width], pooled, atol=1e-5)
    assert not model.net._forward_hooks and all(not e._forward_hooks for e in ends)  # no hook left behind


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_freeze_features_trains_only_the_head_and_keeps_frozen_norms_in_eval(backbone):
    model = ChestXrayClassifier(["a", "b", "c"], 32, backbone=backbone, pretrained=False, freeze="features")
    head_params = {id(p) for p in get_backbone(backbone).head(model.net).parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(id(p) in head_params for p in trainable)
    model.train()
    norms = [m for m in model.frozen for m in m.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.training for m in norms)  # BatchNorm statistics of a frozen backbone do not drift


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_freeze_n_freezes_the_first_n_stages_of_every_backbone(backbone):
    """Each further stage frozen freezes more parameters, from the input side, and never the head."""
    net = ChestXrayClassifier(["a", "b"], 32, backbone=backbone, pretrained=False).net
    spec = get_backbone(backbone)
    stages, head = len(spec.blocks(net)), {id(p) for p in spec.head(net).parameters()}
    trainable = []
    for n in range(stages + 1):
        net.requires_grad_(True)
        freeze_stages(net, backbone, n)
        first = next(p for p in net.parameters())  # the first convolution, at the input
        assert first.requires_grad == (n == 0) and all(p.requires_grad for p in net.parameters() if id(p) in head)
        trainable.append(sum(p.numel() for p in net.parameters() if p.requires_grad))
    assert all(a > b for a, b in zip(trainable, trainable[1:], strict=False)), trainable
    with pytest.raises(ConfigError, match=rf"model.freeze={stages + 1}: must be none, features or 0..{stages}"):
        freeze_stages(net, backbone, stages + 1)


@pytest.mark.parametrize("freeze, trainable_convs", [("none", 16), ("features", 0), (2, 12), (5, 0)])
def test_vgg19_freeze_options(freeze, trainable_convs):
    model = ChestXrayClassifier(["a", "b", "c"], 32, pretrained=False, freeze=freeze)
    convs = [m for m in model.net.features if isinstance(m, nn.Conv2d)]
    assert sum(m.weight.requires_grad for m in convs) == trainable_convs
    assert all(p.requires_grad for p in model.net.classifier.parameters())
    with pytest.raises(ConfigError, match=r"model.freeze=6: must be none, features or 0..5 \(the stages of vgg19\)"):
        ChestXrayClassifier(["a"], 32, pretrained=False, freeze=6)


def test_local_weights_file_is_loaded(tmp_path):
    reference = models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    net = build_network("resnet50", 3, pretrained=True, weights_path=str(path))
    assert torch.equal(net.conv1.weight, reference.conv1.weight) and torch.equal(
        net.layer4[0].bn1.bias, reference.layer4[0].bn1.bias
    )


def test_failed_download_names_the_weights_and_both_ways_out(monkeypatch, tmp_path):
    def offline(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(models.WeightsEnum, "get_state_dict", offline)
    for name in ("vgg19", "densenet121"):
        with pytest.raises(WeightsError, match=rf"could not download the ImageNet {name} weights \(https://") as err:
            build_network(name, 3, pretrained=True)
        assert "model.weights_path=FILE" in str(err.value) and "model.pretrained=false" in str(err.value)
    with pytest.raises(WeightsError, match="file not found"):
        build_network("vgg19", 3, pretrained=True, weights_path=str(tmp_path / "missing.pth"))


def test_wrong_weights_files_say_what_they_are(tmp_path):
    wrapped = tmp_path / "wrapped.pth"
    state = models.efficientnet_b0(weights=None).state_dict()
    torch.save({"state_dict": state}, wrapped)  # a common wrapping: accepted
    assert build_network("efficientnet_b0", 3, weights_path=str(wrapped)) is not None
    truncated = tmp_path / "part.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("classifier")}, truncated)
    expected = r"not torchvision efficientnet_b0 weights: keys missing 2 \(e.g. classifier.1.bias"
    with pytest.raises(WeightsError, match=expected):
        build_network("efficientnet_b0", 3, weights_path=str(truncated))
    other = tmp_path / "densenet.pth"
    torch.save(models.densenet121(weights=None).state_dict(), other)
    with pytest.raises(
        WeightsError, match=r"model.weights_path=.*densenet.pth: not torchvision resnet50 weights"
    ) as err:
        build_network("resnet50", 3, weights_path=str(other))
    assert "\n" not in str(err.value)


def test_compile_keeps_parameter_names_and_checkpoints():
    model = ChestXrayClassifier(["a", "b", "c"], 32, pretrained=False, compile=True)
    names = list(model.state_dict())
    model.configure_model()
    assert list(model.state_dict()) == names  # compiled in place: checkpoints load into an uncompiled model
    with pytest.raises(ConfigError, match="model.compile=fast: must be"):
        ChestXrayClassifier(["a"], 32, pretrained=False, compile="fast")


def save_checkpoint(model: ChestXrayClassifier, path) -> None:
    """A checkpoint as Lightning writes it (state_dict and hyper_parameters)."""
    saved = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "epoch": 0}
    torch.save({**saved, "pytorch-lightning_version": L.__version__}, path)


def test_checkpoints_load_through_lightning_and_name_their_backbone(tmp_path):
    model = ChestXrayClassifier(["a", "b", "c"], 32, backbone="efficientnet_b0", pretrained=False).eval()
    path = tmp_path / "m.ckpt"
    save_checkpoint(model, path)
    loaded = load_model(path)
    assert loaded.hparams.backbone == "efficientnet_b0" and not loaded.training
    x = images(4)
    with torch.inference_mode():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_a_checkpoint_of_an_older_version_loads_as_vgg19_uncalibrated(tmp_path):
    model = ChestXrayClassifier(["a", "b", "c"], 32, pretrained=False).eval()
    state = {k: v for k, v in model.state_dict().items() if k not in ("temperature", "calibrated")}
    hparams = {k: v for k, v in model.hparams.items() if k not in ("backbone", "calibrate")}
    torch.save(
        {"state_dict": state, "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.6"}, tmp_path / "old.ckpt"
    )
    old = load_model(tmp_path / "old.ckpt")
    assert old.hparams.backbone == "vgg19" and float(old.temperature) == 1.0 and not bool(old.calibrated)


def test_unknown_settings_or_weights_that_do_not_fit_are_one_line(tmp_path):
    model = ChestXrayClassifier(["a", "b", "c"], 32, pretrained=False)
    path = tmp_path / "future.ckpt"
    lightning_version = {"pytorch-lightning_version": L.__version__}
    hparams = {**model.hparams, "mixup": 0.2}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams, **lightning_version}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(err.value) == (
        f"ckpt={path}: its hyper_parameters have setting(s) this version does not know: mixup "
        "(written by another version of chestxray?)"
    )
    wrong = tmp_path / "wrong.ckpt"
    hparams = {**model.hparams, "backbone": "resnet50"}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams, **lightning_version}, wrong)
    with pytest.raises(CheckpointError, match=r"wrong.ckpt: its weights do not fit the model") as err:
        load_model(wrong)
    assert "\n" not in str(err.value)


def test_an_ensemble_averages_its_members_probabilities(tmp_path):
    """Two different models (one a ResNet): the ensemble is the mean of their softmax outputs, not the softmax of
    their mean logits, and not the first member alone."""
    torch.manual_seed(0)
    a = ChestXrayClassifier(["x", "y", "z"], 32, pretrained=False).eval()
    b = ChestXrayClassifier(["x", "y", "z"], 32, backbone="resnet50", pretrained=False).eval()
    with torch.no_grad():
        b.net.fc[-1].bias.copy_(torch.tensor([3.0, -2.0, 0.0]))  # make b clearly different
        b.temperature.fill_(2.0)
    save_checkpoint(a, tmp_path / "a.ckpt")
    save_checkpoint(b, tmp_path / "b.ckpt")
    members = load_models([tmp_path / "a.ckpt", tmp_path / "b.ckpt"])
    x = images(6)
    with torch.inference_mode():
        pa, pb = a(x).softmax(1), b(x).softmax(1)
        ensemble = Ensemble(members)(x)
        logit_mean = ((a(x) + b(x)) / 2).softmax(1)
    assert torch.allclose(ensemble, (pa + pb) / 2, atol=1e-6)
    assert not torch.allclose(ensemble, pa, atol=1e-3) and not torch.allclose(ensemble, logit_mean, atol=1e-3)
    assert torch.allclose(pb, (b.logits(x) / 2).softmax(1), atol=1e-6)  # each member applies its temperature
    assert isinstance(Ensemble(members).net, Probabilities)


def test_members_must_share_classes_and_image_size(tmp_path):
    a = ChestXrayClassifier(["x", "y"], 32, pretrained=False)
    b = ChestXrayClassifier(["x", "y"], 64, pretrained=False)
    save_checkpoint(a, tmp_path / "a.ckpt")
    save_checkpoint(b, tmp_path / "b.ckpt")
    with pytest.raises(CheckpointError) as err:
        load_models([tmp_path / "a.ckpt", tmp_path / "b.ckpt"])
    assert str(err.value) == (
        f"ckpt={tmp_path / 'b.ckpt'} cannot be averaged with {tmp_path / 'a.ckpt'}: "
        f"image_size of {tmp_path / 'a.ckpt'}=32 but the checkpoint has 64"
    )


def test_every_setting_the_model_takes_is_in_its_config():
    """conf/model/classifier.yaml sets every argument of the model (so the composition test covers them); init_from is
    the run's, not the model's (train.py loads its weights: chestxray.training.fit.instantiate_model)."""
    from tests.conftest import compose_config

    model_cfg = compose_config("train", ["paths.output_dir=/tmp/unused"]).model
    arguments = set(inspect.signature(ChestXrayClassifier.__init__).parameters) - {"self"}
    assert arguments == set(model_cfg) - {"_target_", "_convert_", "init_from"}


@pytest.mark.slow  # a subprocess or a whole export: the full suite
def test_train_py_prints_a_clear_error_and_exits_2_without_data(tmp_path):
    run = tmp_path / "run"
    result = run_script(
        "train.py",
        f"data.data_dir={tmp_path / 'nowhere'}",
        "data.download=false",
        "model.pretrained=false",
        f"hydra.run.dir={run}",
        ok=False,
    )
    assert result.returncode == 2
    line = f"train.py: error: DataError: data folder not found: {tmp_path / 'nowhere'}"
    assert line in result.stderr and "Traceback" not in result.stderr
    # the refused run leaves only its log, which says why
    assert [p.name for p in run.iterdir()] == ["train.log"] and line in (run / "train.log").read_text()


def test_a_non_finite_loss_in_any_accumulated_batch_stops_the_step():
    model = ChestXrayClassifier(["a", "b", "c"], 32, pretrained=False)
    model.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    # trainer.accumulate_grad_batches=2: the first batch diverged, the second did not; one optimizer step follows
    model._pending_losses = [(torch.tensor(float("nan")), 6), (torch.tensor(0.7), 7)]
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan .*\(batch 6\)"):
        model.on_before_optimizer_step(None)
    model._pending_losses = [(torch.tensor(0.9), 8), (torch.tensor(0.7), 9)]
    model.on_before_optimizer_step(None)  # finite: the step goes ahead
    assert model._pending_losses == []


def test_a_checkpoint_written_by_0_3_0_loads_and_answers_as_it_did(tmp_path):
    """Checkpoints of chestxray 0.3.0 (before the package's folders) still load, through the same reading and
    Lightning's load_from_checkpoint, and give the probabilities 0.3.0 gave (tests/compat.py)."""
    import json

    from chestxray.models.checkpoints import load_model
    from tests.compat import fill_checkpoint, probe_images

    skeleton = json.loads((Path(__file__).parent / "fixtures" / "checkpoint-0.3.0.json").read_text())
    path = tmp_path / "best.ckpt"
    torch.save(fill_checkpoint(skeleton), path)
    model = load_model(path)
    with torch.no_grad():
        probs = model(torch.from_numpy(probe_images(32))).softmax(1).numpy()
    np.testing.assert_allclose(probs, np.array(skeleton["expected_probabilities"]), atol=1e-5)
    assert model.classes == ["Normal", "Covid", "Viral Pneumonia"] and float(model.temperature) == 1.5
