"""Diabetic-retinopathy grader: a torchvision backbone and a new 5-grade head.

Backbones: InceptionV3 (299 px, with its auxiliary classifier), ResNet-50 (512 px), and a
ResNet-10 (torchvision's ResNet with one block per stage) for the CPU-sized tiny flavour.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torchvision.models import inception_v3, resnet50
from torchvision.models.resnet import BasicBlock, ResNet

from models.registry import ModelError, register

NUM_GRADES = 5  # International Clinical DR scale: none, mild, moderate, severe, proliferative

# Modules of each backbone that `freeze="early"` keeps fixed: the stem and the first stages,
# which learn generic edges and blobs and are the first to transfer between datasets.
_EARLY = {
    "inception_v3": (
        "Conv2d_1a_3x3",
        "Conv2d_2a_3x3",
        "Conv2d_2b_3x3",
        "Conv2d_3b_1x1",
        "Conv2d_4a_3x3",
        "Mixed_5b",
        "Mixed_5c",
        "Mixed_5d",
    ),
    "resnet50": ("conv1", "bn1", "layer1", "layer2"),
    "resnet10": ("conv1", "bn1", "layer1", "layer2"),
}


def _backbone(kind: str) -> tuple[nn.Module, int]:
    """Backbone with its classifier removed, and the width of its pooled features."""
    if kind == "inception_v3":
        net = inception_v3(weights=None, aux_logits=True, init_weights=True)
        # The auxiliary classifier is a head of its own: give it our grades.
        net.AuxLogits.fc = nn.Linear(net.AuxLogits.fc.in_features, NUM_GRADES)
    elif kind == "resnet50":
        net = resnet50(weights=None)
    elif kind == "resnet10":
        net = ResNet(BasicBlock, [1, 1, 1, 1])
    else:
        raise ModelError(f"unknown backbone '{kind}' (valid: inception_v3, resnet50, resnet10)")
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


def _load_backbone_weights(net: nn.Module, path: str) -> None:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelError(f"pretrained weights not found: {file}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    # A torchvision checkpoint carries the 1000-class ImageNet fc: our head replaces it.
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.startswith("AuxLogits.fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("AuxLogits.fc.")]
    if missing or unexpected:
        raise ModelError(
            f"pretrained weights {file} do not fit the backbone "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[0]})"
        )


class RetinopathyNet(nn.Module):
    """Backbone -> pooled features -> dropout, hidden layer, dropout -> grade logits.

    In training mode an InceptionV3 backbone returns ``(logits, aux_logits)``; the training
    task weighs the auxiliary loss. In eval mode every backbone returns logits only.
    """

    def __init__(
        self,
        backbone: str = "inception_v3",
        hidden: int = 512,
        dropout: float = 0.3,
        freeze: str = "none",
        pretrained: str | None = None,
        num_classes: int = NUM_GRADES,
    ):
        super().__init__()
        self.backbone_name = backbone
        self.backbone, width = _backbone(backbone)
        if pretrained:
            _load_backbone_weights(self.backbone, pretrained)
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(width, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self.freeze(freeze)

    def freeze(self, level: str) -> None:
        if level not in ("none", "early", "all"):
            raise ModelError(f"freeze must be none, early or all (got {level!r})")
        for name, module in self.backbone.named_children():
            trainable = level == "none" or (level == "early" and name not in _EARLY[self.backbone_name])
            # The auxiliary classifier's new fc is part of the head, never frozen.
            for pname, p in module.named_parameters():
                p.requires_grad = trainable or (name == "AuxLogits" and pname.startswith("fc."))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # B = batch, 3 x H x W normalised RGB in; B x num_classes logits out.
        feats = self.backbone(x)
        if isinstance(feats, tuple):  # InceptionOutputs(logits=features, aux_logits) in training
            feats, aux = feats
            return self.head(feats), aux
        return self.head(feats)


@register("retinopathy", "tiny")
def tiny(**kw) -> RetinopathyNet:
    """ResNet-10 with a small head: trains in minutes on 2 CPU cores at 64-128 px."""
    return RetinopathyNet(**{"backbone": "resnet10", "hidden": 64, "dropout": 0.1, **kw})


@register("retinopathy", "full")
def full(**kw) -> RetinopathyNet:
    """InceptionV3 at 299 px, as in the seed's EyePACS grader."""
    return RetinopathyNet(**{"backbone": "inception_v3", "hidden": 512, "dropout": 0.3, **kw})


@register("retinopathy", "resnet50")
def resnet50_512(**kw) -> RetinopathyNet:
    """ResNet-50 at 512 px, the seed's medical-imaging classifier."""
    return RetinopathyNet(**{"backbone": "resnet50", "hidden": 512, "dropout": 0.3, **kw})
