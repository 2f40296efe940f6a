"""model.backbone=xrv_densenet121: torchxrayvision's DenseNet-121 under the notebook's head, its input conversion in
the network (so Grad-CAM and ONNX need nothing new), its weights from model.weights_path, one line when offline.

The architecture is used with random weights here: no test downloads torchxrayvision's weights."""

import numpy as np
import pytest
import torch
from torch import nn

from chestxray.errors import ConfigError, WeightsError
from chestxray.models.backbones import XRV, XRV_RESOLUTION, build_network, get_backbone
from chestxray.models.classifier import ChestXrayClassifier

xrv = pytest.importorskip("torchxrayvision")


@pytest.fixture(scope="module")
def xrv_file(tmp_path_factory):
    """torchxrayvision's DenseNet with random (but not default) weights, saved as its state dict with op_threshs, as
    xrv.models.DenseNet(weights=...).state_dict() gives it."""
    torch.manual_seed(3)
    net = xrv.models.DenseNet(num_classes=18, op_threshs=torch.full((18,), 0.5))
    for m in net.modules():  # BatchNorm statistics other than 0 and 1, so loading them is visible
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("xrv") / "xrv-densenet121.pth"
    torch.save(net.state_dict(), path)
    return net.eval(), path


def test_weights_path_loads_torchxrayvisions_state_dict_under_the_notebooks_head(xrv_file):
    reference, path = xrv_file
    net = build_network(XRV, 3, pretrained=True, weights_path=str(path))
    assert torch.equal(net.features.conv0.weight, reference.features.conv0.weight)
    assert torch.equal(net.features.norm5.running_var, reference.features.norm5.running_var)
    assert net.features.conv0.in_channels == 1  # torchxrayvision's one grey channel
    kinds = [type(m).__name__ for m in net.classifier]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear"] and net.classifier[0].in_features == 1024


def test_the_model_converts_its_input_as_torchxrayvision_expects(xrv_file):
    """uint8 grey images through the classifier's preprocessing and the network's conversion give torchxrayvision's
    own input (utils.normalize to [-1024, 1024], one channel, 224 px) and therefore its own pooled features."""
    reference, path = xrv_file
    model = ChestXrayClassifier(["a", "b", "c"], XRV_RESOLUTION, backbone=XRV, weights_path=str(path)).eval()
    grey = np.random.default_rng(0).integers(0, 256, (2, XRV_RESOLUTION, XRV_RESOLUTION), dtype=np.uint8)
    images = torch.from_numpy(np.repeat(grey[:, None], 3, axis=1))
    expected = torch.from_numpy(np.stack([xrv.utils.normalize(g, 255)[None] for g in grey]))
    with torch.no_grad():
        converted = model.net.to_xrv(model.preprocess(images))
        assert converted.shape == (2, 1, 224, 224) and converted.min() >= -1024 and converted.max() <= 1024
        assert torch.allclose(converted, expected, atol=1e-3)
        pooled = get_backbone(XRV).trunk(model.net, model.preprocess(images))
        assert torch.allclose(pooled, reference.features2(expected), rtol=1e-5, atol=1e-3)


def test_any_input_size_is_resized_to_224_inside_the_network(xrv_file):
    _, path = xrv_file
    model = ChestXrayClassifier(["a", "b", "c"], 32, backbone=XRV, weights_path=str(path)).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert model.net.to_xrv(model.preprocess(images)).shape == (2, 1, 224, 224)
        assert model(images).shape == (2, 3)


def test_offline_download_is_one_line_naming_both_settings(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(xrv.models, "get_weights", offline)
    with pytest.raises(WeightsError) as err:
        build_network(XRV, 3, pretrained=True, xrv_weights="densenet121-res224-rsna")
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.xrv_weights=densenet121-res224-rsna: ")
    assert "https://" in message and "model.weights_path=FILE" in message and "model.pretrained=false" in message


def test_wrong_files_and_settings_are_refused_in_one_line(tmp_path):
    other = tmp_path / "densenet.pth"
    torch.save(build_network("densenet121", 3, pretrained=False).state_dict(), other)  # torchvision's: 3 channels
    with pytest.raises(WeightsError, match=r"densenet.pth: not torchxrayvision xrv_densenet121 weights"):
        build_network(XRV, 3, weights_path=str(other))
    with pytest.raises(ConfigError, match="model.xrv_weights=densenet121-res512: not one of"):
        build_network(XRV, 3, pretrained=True, xrv_weights="densenet121-res512")
    with pytest.raises(ConfigError, match=r"model.backbone=xrv_densenet121 needs model.mean and model.std"):
        ChestXrayClassifier(["a", "b"], 32, backbone=XRV, pretrained=False, mean=(0.485, 0.456, 0.406))


def test_gradcam_looks_at_its_last_dense_block(xrv_file):
    from chestxray.evaluation.saliency import gradcam_maps

    _, path = xrv_file
    model = ChestXrayClassifier(["a", "b", "c"], 32, backbone=XRV, weights_path=str(path)).eval()
    assert get_backbone(XRV).gradcam_layer(model.net) is model.net.features.norm5
    maps = gradcam_maps(model, torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), [0, 2])
    assert maps.shape == (2, 32, 32) and np.isfinite(maps).all() and maps.max() > 0


@pytest.mark.slow  # a subprocess or a whole export: the full suite
def test_onnx_graph_gives_the_torch_probabilities(xrv_file, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from chestxray.inference.onnx import export_onnx

    _, path = xrv_file
    model = ChestXrayClassifier(["a", "b", "c"], 32, backbone=XRV, weights_path=str(path)).eval()
    graph = export_onnx([model], tmp_path / "xrv.onnx")
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(images).softmax(1).numpy()
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4
