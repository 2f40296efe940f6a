import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.models import vgg19

from chestxray import model as model_module
from chestxray.model import ChestXrayClassifier, WeightsError, build_vgg19
from tests.conftest import ROOT


def test_head_is_the_notebooks_and_returns_logits():
    net = build_vgg19(3, pretrained=False)
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
        logits = model(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert logits.shape == (2, 3) and not torch.allclose(logits.softmax(1).sum(1), logits.sum(1))


def test_local_weights_file_is_loaded(tmp_path):
    reference = vgg19(weights=None)
    path = tmp_path / "vgg19.pth"
    torch.save(reference.state_dict(), path)
    net = build_vgg19(3, pretrained=True, weights_path=str(path))
    assert torch.equal(net.features[0].weight, reference.features[0].weight)


def test_failed_download_names_both_ways_out(monkeypatch, tmp_path):
    def offline(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(model_module.VGG19_Weights, "get_state_dict", offline)
    with pytest.raises(WeightsError, match="model.weights_path=FILE") as err:
        build_vgg19(3, pretrained=True)
    assert "model.pretrained=false" in str(err.value)
    with pytest.raises(WeightsError, match="file not found"):
        build_vgg19(3, pretrained=True, weights_path=str(tmp_path / "missing.pth"))


def test_wrong_weights_files_say_what_they_are(tmp_path):
    wrapped = tmp_path / "wrapped.pth"
    state = vgg19(weights=None).state_dict()
    torch.save({"state_dict": state}, wrapped)  # a common wrapping: accepted
    assert build_vgg19(3, weights_path=str(wrapped)) is not None
    truncated = tmp_path / "vgg_part.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("classifier")}, truncated)
    with pytest.raises(WeightsError, match=r"not torchvision VGG19 weights: keys missing 6 \(e.g. classifier.0.bias"):
        build_vgg19(3, weights_path=str(truncated))
    reshaped = tmp_path / "vgg_other.pth"
    torch.save({**state, "features.0.weight": torch.zeros(64, 1, 3, 3)}, reshaped)
    with pytest.raises(WeightsError, match=r"keys wrong shape 1 \(e.g. features.0.weight\)"):
        build_vgg19(3, weights_path=str(reshaped))


@pytest.mark.parametrize("freeze, trainable_convs", [("none", 16), ("features", 0), (2, 12), (5, 0)])
def test_freeze_options(freeze, trainable_convs):
    model = ChestXrayClassifier(["a", "b", "c"], 32, pretrained=False, freeze=freeze)
    convs = [m for m in model.net.features if isinstance(m, nn.Conv2d)]
    assert sum(m.weight.requires_grad for m in convs) == trainable_convs
    assert all(p.requires_grad for p in model.net.classifier.parameters())


def test_compile_keeps_parameter_names_and_checkpoints():
    model = ChestXrayClassifier(["a", "b", "c"], 32, pretrained=False, compile=True)
    names = list(model.state_dict())
    model.configure_model()
    assert list(model.state_dict()) == names  # compiled in place: checkpoints load into an uncompiled model
    with pytest.raises(ValueError, match="model.compile must be"):
        ChestXrayClassifier(["a"], 32, pretrained=False, compile="fast")


def test_train_py_prints_a_clear_error_and_exits_2_without_data(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            f"data.data_dir={tmp_path / 'nowhere'}",
            "data.download=false",
            "model.pretrained=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert f"train.py: error: DataError: data folder not found: {tmp_path / 'nowhere'}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_non_finite_loss_in_any_accumulated_batch_stops_the_step():
    import lightning as L

    from chestxray.model import NonFiniteLossError

    model = ChestXrayClassifier(["a", "b", "c"], 32, pretrained=False)
    model.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    # trainer.accumulate_grad_batches=2: the first batch diverged, the second did not; one optimizer step follows
    model._pending_losses = [(torch.tensor(float("nan")), 6), (torch.tensor(0.7), 7)]
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan .*\(batch 6\)"):
        model.on_before_optimizer_step(None)
    model._pending_losses = [(torch.tensor(0.9), 8), (torch.tensor(0.7), 9)]
    model.on_before_optimizer_step(None)  # finite: the step goes ahead
    assert model._pending_losses == []
