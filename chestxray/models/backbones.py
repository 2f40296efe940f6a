"""torchvision backbones under the notebook's head, and what each family needs to be built, frozen and explained.

Every backbone keeps torchvision's own module (so `model.weights_path=` takes torchvision's state dicts, and checkpoints
name parameters as torchvision does) with its ImageNet head replaced by the notebook's:

    pool -> Linear(features, 256) -> ReLU -> Dropout -> Linear(256, classes)

The network is run as `head(trunk(x))`: the trunk is everything up to the pooled feature vector, the head is the new
part. That split is what `model.cache_features` caches and what `model.freeze=features` freezes; `blocks` are the
stages `model.freeze=N` freezes from the input side, and the outputs of those stages, each averaged over its positions
(`stage_widths` channels), are what the multi-layer out-of-distribution detector compares; `gradcam_layer` is the last
convolutional stage, where Grad-CAM looks (pytorch-grad-cam's choice for each family).

`xrv_densenet121` is torchxrayvision's DenseNet-121, pretrained on chest radiographs (the `xrv` extra): the same
DenseNet under the same head, with torchxrayvision's input conversion in front of it inside the network (see
XrvDenseNet), so that the store, predict, ONNX and Grad-CAM treat it as any other backbone.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from chestxray.errors import ConfigError, WeightsError

HEAD_WIDTH = 256


@dataclass(frozen=True)
class Backbone:
    """One torchvision family: where its head sits, how to reach its pooled features, its stages."""

    name: str
    width: int  # channels of the pooled feature vector
    head_attr: str  # the attribute holding torchvision's ImageNet head, replaced by ours
    trunk: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # images -> pooled features (the head's input)
    blocks: Callable[[nn.Module], list[list[nn.Module]]]  # stages from the input side, for model.freeze=N
    gradcam_layer: Callable[[nn.Module], nn.Module]
    # channels at the end of each of `blocks`: what the multi-layer detector (chestxray.models.ood) averages
    stage_widths: tuple[int, ...] = ()
    keep_head_prefix: int = 0  # modules of torchvision's head kept before ours (ConvNeXt's LayerNorm2d, Flatten)

    def head(self, net: nn.Module) -> nn.Module:
        return getattr(net, self.head_attr)

    def trunk_and_stages(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """N x (width + sum(stage_widths)): the pooled features (the head's input), then each stage's output averaged
        over its positions, in float32: one pass of the trunk, the stage outputs read by forward hooks on the last
        module of each of `blocks` (so no family needs its forward written twice)."""
        means: list[torch.Tensor] = []
        ends = [block[-1] for block in self.blocks(net)]
        handles = [e.register_forward_hook(lambda _m, _a, out: means.append(out.float().mean((2, 3)))) for e in ends]
        try:
            pooled = self.trunk(net, x).flatten(1).float()
        finally:
            for handle in handles:
                handle.remove()
        return torch.cat([pooled, *means], 1)

    def head_on_pooled(self, net: nn.Module, features: torch.Tensor) -> torch.Tensor:
        """The head on the pooled part of trunk_and_stages' output (N x C x 1 x 1 where a kept LayerNorm2d needs it)."""
        head = self.head(net)
        pooled = features[:, : self.width].to(next(head.parameters()).dtype)  # the head's own under *-true precision
        return head(pooled[:, :, None, None] if self.keep_head_prefix else pooled)


def _vgg_trunk(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(net.avgpool(net.features(x)), 1)


def _vgg_blocks(net: nn.Module) -> list[list[nn.Module]]:
    # Each of VGG19's five convolutional blocks ends with a MaxPool.
    blocks, current = [], []
    for layer in net.features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(current)
            current = []
    return blocks


def _resnet_trunk(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return torch.flatten(net.avgpool(x), 1)


def _densenet_trunk(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # torchvision applies ReLU in place here; out of place keeps Grad-CAM's hook on norm5 valid
    return torch.flatten(F.adaptive_avg_pool2d(F.relu(net.features(x)), 1), 1)


def _densenet_blocks(net: nn.Module) -> list[list[nn.Module]]:
    f = net.features
    return [
        [f.conv0, f.norm0, f.relu0, f.pool0],
        [f.denseblock1, f.transition1],
        [f.denseblock2, f.transition2],
        [f.denseblock3, f.transition3],
        [f.denseblock4, f.norm5],
    ]


XRV = "xrv_densenet121"
XRV_RESOLUTION = 224  # torchxrayvision's DenseNet weights were all trained at 224 x 224
# torchxrayvision's DenseNet-121 weights (model.xrv_weights): all datasets, or one of them
XRV_WEIGHTS = (
    "densenet121-res224-all",
    "densenet121-res224-rsna",
    "densenet121-res224-nih",
    "densenet121-res224-pc",
    "densenet121-res224-chex",
    "densenet121-res224-mimic_nb",
    "densenet121-res224-mimic_ch",
)


class XrvDenseNet(nn.Module):
    """torchxrayvision's DenseNet-121 (`features`, `classifier`: its parameter names) taking the classifier's input.

    The classifier hands every network (x / 255 - mean) / std, which with this backbone's required mean = std = 0.5 is
    2 x / 255 - 1 in [-1, 1]. torchxrayvision expects one channel, (2 x / maxval - 1) * 1024 in [-1024, 1024], at
    224 x 224: so the channels are averaged, multiplied by 1024 and resized (bilinear, as torchxrayvision's own
    fix_resolution) to 224 here. Its centre crop to a square is not needed: the pipeline's resize is already square.
    """

    def __init__(self, densenet: nn.Module):
        super().__init__()
        self.features = densenet.features
        self.classifier = densenet.classifier

    def to_xrv(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(1, keepdim=True) * 1024.0
        if x.shape[-2:] != (XRV_RESOLUTION, XRV_RESOLUTION):
            x = F.interpolate(x, size=(XRV_RESOLUTION, XRV_RESOLUTION), mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(_xrv_trunk(self, x))


def _xrv_trunk(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _densenet_trunk(net, net.to_xrv(x))


def _pooled_trunk(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(net.avgpool(net.features(x)), 1)


def _convnext_trunk(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.avgpool(net.features(x))  # N x C x 1 x 1: the kept LayerNorm2d and Flatten come first in the head


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            "vgg19", 512, "classifier", _vgg_trunk, _vgg_blocks, lambda net: net.features[35], (64, 128, 256, 512, 512)
        ),
        Backbone(
            "resnet50",
            2048,
            "fc",
            _resnet_trunk,
            lambda net: [[net.conv1, net.bn1], [net.layer1], [net.layer2], [net.layer3], [net.layer4]],
            lambda net: net.layer4[-1],
            (64, 256, 512, 1024, 2048),
        ),
        Backbone(
            "densenet121",
            1024,
            "classifier",
            _densenet_trunk,
            _densenet_blocks,
            lambda net: net.features.norm5,
            (64, 128, 256, 512, 1024),
        ),
        Backbone(
            XRV,
            1024,
            "classifier",
            _xrv_trunk,
            _densenet_blocks,
            lambda net: net.features.norm5,
            (64, 128, 256, 512, 1024),
        ),
        Backbone(
            "efficientnet_b0",
            1280,
            "classifier",
            _pooled_trunk,
            lambda net: [[stage] for stage in net.features],
            lambda net: net.features[-1],
            (32, 16, 24, 40, 80, 112, 192, 320, 1280),
        ),
        Backbone(
            "convnext_tiny",
            768,
            "classifier",
            _convnext_trunk,
            lambda net: [[net.features[i], net.features[i + 1]] for i in (0, 2, 4, 6)],  # stem or downsampling + stage
            lambda net: net.features[-1],
            (96, 192, 384, 768),
            keep_head_prefix=2,
        ),
    )
}


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone={name}: not one of {list(BACKBONES)}")
    return BACKBONES[name]


def imagenet_weights(name: str) -> models.WeightsEnum:
    """torchvision's recommended ImageNet weights of the family (IMAGENET1K_V1 for VGG19, as the notebook)."""
    return models.get_model_weights(name).DEFAULT


def _xrv_densenet() -> nn.Module:
    """torchxrayvision's DenseNet-121 architecture with random weights (its 18 pathology outputs)."""
    from chestxray.errors import require

    xrv = require("torchxrayvision", "xrv", f"model.backbone={XRV}")
    return xrv.models.DenseNet(num_classes=18)


def _reference_state(name: str) -> dict[str, torch.Tensor]:
    """torchvision's (or torchxrayvision's) parameter names and shapes for `name` (built on the meta device: no
    memory, no time)."""
    with torch.device("meta"):
        net = _xrv_densenet() if name == XRV else models.get_model(name, weights=None)
        state = net.state_dict()
    state.pop("op_threshs", None)  # torchxrayvision's per-pathology thresholds: its head's, not the network's
    return state


def read_weights(weights_path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """A torchvision state dict of backbone `name` from a file, or WeightsError saying what the file is (one line)."""
    path = Path(weights_path)
    setting = f"model.weights_path={weights_path}"
    if not path.is_file():
        raise WeightsError(f"{setting}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and format errors all mean "not a torch weights file"
        detail = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise WeightsError(f"{setting}: not a PyTorch weights file ({detail})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if isinstance(state, dict) and name == XRV:
        state.pop("op_threshs", None)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{setting}: not a state dict (a mapping of parameter names to tensors)")
    expected = _reference_state(name)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [
            f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        library = "torchxrayvision" if name == XRV else "torchvision"
        raise WeightsError(f"{setting}: not {library} {name} weights: keys {'; '.join(parts)}")
    return state


def imagenet_state(name: str, weights_path: str | None) -> dict[str, torch.Tensor]:
    """The ImageNet weights of `name`: from model.weights_path, else downloaded (cached by torch.hub)."""
    if weights_path:
        return read_weights(weights_path, name)
    weights = imagenet_weights(name)
    try:
        return weights.get_state_dict(progress=False)
    except Exception as err:  # noqa: BLE001 - offline, proxy, corrupt download: same advice
        raise WeightsError(
            f"could not download the ImageNet {name} weights ({weights.url}): {type(err).__name__}: {err}\n"
            "  On a machine without internet, download that file elsewhere and pass model.weights_path=FILE,\n"
            "  or train from scratch with model.pretrained=false."
        ) from err


def xrv_state(xrv_weights: str, weights_path: str | None) -> dict[str, torch.Tensor]:
    """torchxrayvision's `xrv_weights`: from model.weights_path (a state dict), else downloaded by torchxrayvision
    (cached in ~/.torchxrayvision); offline, one line saying both ways out."""
    if weights_path:
        return read_weights(weights_path, XRV)
    if xrv_weights not in XRV_WEIGHTS:
        raise ConfigError(f"model.xrv_weights={xrv_weights}: not one of {', '.join(XRV_WEIGHTS)}")
    _xrv_densenet()  # the extra, or one line naming it
    import torchxrayvision as xrv

    url = xrv.models.model_urls[xrv_weights]["weights_url"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its "Downloading weights..." lines: the error says it all
            return xrv.models.DenseNet(weights=xrv_weights).state_dict()
    except Exception as err:  # noqa: BLE001 - offline, proxy, corrupt download: same advice
        raise WeightsError(
            f"model.xrv_weights={xrv_weights}: torchxrayvision could not download {url} ({type(err).__name__}); "
            "without internet, save xrv.models.DenseNet(weights=...).state_dict() to a file elsewhere and pass "
            "model.weights_path=FILE, or train from scratch with model.pretrained=false"
        ) from None


def build_network(
    name: str,
    num_classes: int,
    pretrained: bool = True,
    weights_path: str | None = None,
    dropout: float = 0.1,
    xrv_weights: str = XRV_WEIGHTS[0],
) -> nn.Module:
    """torchvision's `name` (ImageNet weights when pretrained; torchxrayvision's DenseNet and its `xrv_weights` for
    xrv_densenet121) with the notebook's head on its pooled features."""
    spec = get_backbone(name)
    if name == XRV:
        state = xrv_state(xrv_weights, weights_path) if pretrained or weights_path else None
    else:
        state = imagenet_state(name, weights_path) if pretrained or weights_path else None
    if name == XRV:
        net = XrvDenseNet(_xrv_densenet())
        if state is not None:
            state.pop("op_threshs", None)
            net.load_state_dict(state)
    elif name == "vgg19":
        # torchvision would allocate and draw 120M random numbers for VGG's ImageNet classifier, replaced below (a
        # second per model): build it on the meta device without it, then initialise the convolutions as
        # torchvision's VGG does (or load the ImageNet ones).
        with torch.device("meta"):
            net = models.vgg19(weights=None, init_weights=False)
        net.classifier = nn.Sequential()
        net = net.to_empty(device="cpu")
        if state is None:
            for conv in (m for m in net.features if isinstance(m, nn.Conv2d)):
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
        else:
            net.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")})
        net.avgpool = nn.AdaptiveAvgPool2d(1)  # the notebook's pool: global, whatever the image size
    else:
        net = models.get_model(name, weights=None)
        if state is not None:
            net.load_state_dict(state)
    kept = list(spec.head(net))[: spec.keep_head_prefix] if spec.keep_head_prefix else []
    head = nn.Sequential(
        *kept,
        *([nn.Flatten()] if name == "vgg19" else []),  # the notebook's Flatten (a no-op after VGG's own flatten)
        nn.Linear(spec.width, HEAD_WIDTH),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(HEAD_WIDTH, num_classes),
    )
    setattr(net, spec.head_attr, head)
    return net


def freeze_stages(net: nn.Module, name: str, setting: str | int | None) -> list[nn.Module]:
    """'none' trains everything; 'features' trains only the head; N freezes the first N stages. Returns the frozen
    modules (kept in eval mode by the LightningModule, so BatchNorm statistics stay those they were trained with)."""
    spec = get_backbone(name)
    blocks = spec.blocks(net)
    if setting in (None, "none", 0):
        return []
    if setting == "features":
        count = len(blocks)
    else:
        try:
            count = int(setting)
        except (TypeError, ValueError):
            count = -1
        if not 0 <= count <= len(blocks):
            raise ConfigError(
                f"model.freeze={setting}: must be none, features or 0..{len(blocks)} (the stages of {name})"
            )
    frozen = [module for block in blocks[:count] for module in block]
    if setting == "features":  # everything outside the new head, including modules between stages
        head = spec.head(net)
        head_ids = {id(m) for m in head.modules()}
        frozen = [m for name_, m in net.named_children() if id(m) not in head_ids]
    for module in frozen:
        module.requires_grad_(False)
    return frozen
