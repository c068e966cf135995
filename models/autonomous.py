"""Multi-camera perception: eight cameras -> CNN features -> transformer fusion -> boxes, lanes, depth.

    images [B, 8, 3, H, W]
      -> backbone per camera (one shared by default; eight as in the seed; or a transformers ConvNeXt)
      -> spatial tokens of every camera + a learned camera embedding + a 2-D sine position
      -> transformer encoder over all cameras' tokens at once (objects across camera borders)
      -> decoder: per camera, object queries and lane queries attend to that camera's fused
         tokens and its next finer feature map
           objects: class (+ "no object"), box (cx, cy, w, h in [0, 1]) -- a set, Hungarian-matched
           lanes:   a fixed number of points per lane slot and a lane-exists logit
      -> depth: the camera's fused tokens, upsampled with the backbone's finer features (a
         convolutional decoder with skip connections) to a full-resolution log-depth map.

The full flavour is the seed's scale: ResNet-50 per camera, d_model 2048, 6 fusion layers.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet50
from torchvision.models.resnet import BasicBlock
from torchvision.ops import Conv2dNormActivation

from models.registry import ModelError, register

NUM_CAMERAS = 8
NUM_CLASSES = 3  # car, truck, pedestrian (data_loaders.autonomous.CLASSES)
BACKBONES = ("tiny", "resnet50", "convnext")


# ------------------------------------------------------------------ backbones: images -> feature pyramid


class _Staged(nn.Module):
    """A stem and stages; forward returns every stage's output (the feature pyramid)."""

    stem: nn.Module
    stages: nn.ModuleList

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, out = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class TinyBackbone(_Staged):
    """A small residual CNN (torchvision blocks) for 2 CPU cores: strides 4, 8, 16."""

    def __init__(self, widths: tuple[int, ...] = (16, 24, 32, 64)):
        super().__init__()
        self.stem = Conv2dNormActivation(3, widths[0], kernel_size=3, stride=2)
        self.stages = nn.ModuleList(
            BasicBlock(
                cin,
                cout,
                stride=2,
                downsample=nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout)),
            )
            for cin, cout in zip(widths[:-1], widths[1:], strict=True)
        )
        self.channels = list(widths[1:])


class ResNet50Backbone(_Staged):
    """torchvision ResNet-50 (weights=None), its four stages: strides 4, 8, 16, 32."""

    def __init__(self):
        super().__init__()
        net = resnet50(weights=None)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.channels = [256, 512, 1024, 2048]


class ConvNextBackbone(nn.Module):
    """A ConvNeXt from `transformers`, built from a config (no hub download): strides 4..32."""

    def __init__(
        self, hidden_sizes: tuple[int, ...] = (32, 64, 128, 256), depths: tuple[int, ...] = (1, 1, 2, 1)
    ):
        super().__init__()
        from transformers import ConvNextBackbone as HFConvNext
        from transformers import ConvNextConfig

        # out_features reaches the config's __post_init__ as a keyword its dataclass fields do not list
        config = ConvNextConfig(  # type: ignore[call-arg]
            hidden_sizes=list(hidden_sizes),
            depths=list(depths),
            out_features=[f"stage{i + 1}" for i in range(len(hidden_sizes))],
        )
        self.net = HFConvNext(config)
        self.channels = list(hidden_sizes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.net(x).feature_maps)


Backbone = TinyBackbone | ResNet50Backbone | ConvNextBackbone


def _backbone(kind: str, widths: tuple[int, ...] | None) -> Backbone:
    if kind == "tiny":
        return TinyBackbone(*([tuple(widths)] if widths else []))
    if kind == "resnet50":
        return ResNet50Backbone()
    if kind == "convnext":
        return ConvNextBackbone(*([tuple(widths)] if widths else []))
    raise ModelError(f"unknown backbone '{kind}' (valid: {', '.join(BACKBONES)})")


# ------------------------------------------------------------------ building blocks


def sine_position(points: torch.Tensor, dim: int) -> torch.Tensor:
    """DETR's fixed 2-D sine embedding of (x, y) points in [0, 1]: [..., 2] -> [..., dim].
    Tokens (at their cell centres) and object queries (at their reference points) share it, so
    a query attends to the tokens near its reference point from the first step."""
    quarter = dim // 4
    freq = torch.exp(
        torch.arange(quarter, device=points.device, dtype=torch.float32) * (-math.log(1e4) / quarter)
    )
    x = points[..., :1].float() * 2 * math.pi * freq
    y = points[..., 1:].float() * 2 * math.pi * freq
    emb = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=-1)
    return F.pad(emb, (0, dim - 4 * quarter)).to(points.dtype)


def grid_points(h: int, w: int, device) -> torch.Tensor:
    """Cell centres of an h x w grid as (x, y) in [0, 1], row-major: [h * w, 2]."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(h * w, 2)


def mlp(dim_in: int, hidden: int, dim_out: int, layers: int = 3) -> nn.Sequential:
    dims = [dim_in] + [hidden] * (layers - 1)
    blocks: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        blocks += [nn.Linear(a, b), nn.ReLU(inplace=True)]
    return nn.Sequential(*blocks, nn.Linear(dims[-1], dim_out))


class DepthDecoder(nn.Module):
    """Fused tokens of one camera -> log-depth, top-down through the backbone's finer feature maps
    (skip connections), with normalised pixel coordinates as extra input channels (the ground's
    depth depends on where a pixel is in the image). The last convolutions run at half the input
    resolution; the log-depth map is then upsampled bilinearly to full resolution."""

    def __init__(self, d_model: int, skip_channels: list[int], width: int):
        super().__init__()
        widths = [max(width // 2**i, 8) for i in range(len(skip_channels) + 1)]
        self.top = Conv2dNormActivation(d_model, widths[0], kernel_size=1)
        self.laterals = nn.ModuleList(
            nn.Conv2d(c, w, 1) for c, w in zip(reversed(skip_channels), widths[1:], strict=True)
        )
        self.reduce = nn.ModuleList(
            Conv2dNormActivation(a, b, kernel_size=3) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.smooth = nn.ModuleList(Conv2dNormActivation(w, w, kernel_size=3) for w in widths[1:])
        self.out = nn.Sequential(
            Conv2dNormActivation(widths[-1] + 2, widths[-1], kernel_size=3),
            nn.Conv2d(widths[-1], 1, 3, padding=1),
        )
        nn.init.constant_(cast(torch.Tensor, self.out[-1].bias), math.log(10.0))  # start near 10 m

    def forward(self, fused: torch.Tensor, skips: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = self.top(fused)
        for lateral, reduce, smooth, skip in zip(
            self.laterals, self.reduce, self.smooth, reversed(skips), strict=True
        ):
            x = F.interpolate(reduce(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = smooth(x + lateral(skip))
        x = F.interpolate(x, size=(size[0] // 2, size[1] // 2), mode="bilinear", align_corners=False)
        n, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(n, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(n, 1, h, w)
        log_depth = self.out(torch.cat([x, ys, xs], dim=1))
        return F.interpolate(log_depth, size=size, mode="bilinear", align_corners=False).squeeze(1)


# ------------------------------------------------------------------ the model


class AutonomousNet(nn.Module):
    """Eight cameras in; per camera: object set, lanes, depth out (see the module docstring).

    forward(images [B, 8, 3, H, W]) -> dict
        logits      [B, 8, Q, num_classes + 1]   last class = "no object"
        boxes       [B, 8, Q, 4]                 cx, cy, w, h normalised to the image
        lanes       [B, 8, L, P, 2]              u, v normalised to the image
        lane_logits [B, 8, L]
        depth       [B, 8, H, W]                 metres
        aux         (training only) [(logits, boxes), ...] of the earlier decoder layers
    """

    def __init__(
        self,
        backbone: str = "tiny",
        backbone_widths: tuple[int, ...] | None = None,
        separate_backbones: bool = False,
        d_model: int = 64,
        heads: int = 4,
        fusion_layers: int = 2,
        decoder_layers: int = 2,
        ff_dim: int = 128,
        dropout: float = 0.0,
        queries: int = 6,
        num_lanes: int = 4,
        lane_points: int = 8,
        depth_width: int = 32,
        num_classes: int = NUM_CLASSES,
        num_cameras: int = NUM_CAMERAS,
    ):
        super().__init__()
        self.num_cameras, self.queries, self.num_lanes, self.lane_points = (
            num_cameras,
            queries,
            num_lanes,
            lane_points,
        )
        self.separate_backbones = separate_backbones
        count = num_cameras if separate_backbones else 1
        backbones = [_backbone(backbone, backbone_widths) for _ in range(count)]
        self.backbones = nn.ModuleList(backbones)
        channels = backbones[0].channels
        self.input_proj = nn.Conv2d(channels[-1], d_model, 1)
        # the decoder also reads the next finer level (thin lane paint, small boxes)
        self.fine_proj = nn.Conv2d(channels[-2], d_model, 1)
        self.level_embed = nn.Parameter(torch.randn(2, d_model) * 0.5)
        self.camera_embed = nn.Parameter(torch.randn(num_cameras, d_model) * 0.5)
        layer: dict[str, Any] = dict(
            d_model=d_model, nhead=heads, dim_feedforward=ff_dim, dropout=dropout, batch_first=True
        )
        self.fusion = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**layer, norm_first=True),
            fusion_layers,
            norm=nn.LayerNorm(d_model),
            enable_nested_tensor=False,
        )
        self.decoder = nn.ModuleList(
            nn.TransformerDecoderLayer(**layer, norm_first=True) for _ in range(decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(d_model)
        # object queries: content + a learned reference point (where in the image to look)
        self.object_queries = nn.Parameter(torch.randn(queries, d_model) * 0.02)
        grid = math.ceil(math.sqrt(queries))
        ref = torch.stack(
            torch.meshgrid(torch.linspace(0.15, 0.85, grid), torch.linspace(0.2, 0.8, grid), indexing="xy"),
            -1,
        ).reshape(-1, 2)[:queries]
        self.reference = nn.Parameter(torch.logit(ref))
        self.lane_queries = nn.Parameter(torch.randn(num_lanes, d_model) * 0.02)
        self.class_head = nn.Linear(d_model, num_classes + 1)
        self.box_head = mlp(d_model, d_model, 4)
        # boxes start at ~15% of the image
        nn.init.constant_(cast(torch.Tensor, self.box_head[-1].bias)[2:], -1.7)
        self.lane_head = mlp(d_model, d_model, lane_points * 2)
        # each camera's lane slots start from a learned anchor line; the head predicts the offset
        self.lane_anchor = nn.Parameter(torch.zeros(num_cameras, num_lanes, lane_points, 2))
        self.lane_exists_head = nn.Linear(d_model, 1)
        self.depth = DepthDecoder(d_model, channels[:-1], depth_width)

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-camera pyramid, cameras folded into the batch: each [B * 8, C, h, w]."""
        b, c = images.shape[:2]
        if not self.separate_backbones:
            return self.backbones[0](images.flatten(0, 1))
        per_camera = [net(images[:, i]) for i, net in enumerate(self.backbones)]  # the seed's 8 ResNets
        return [
            torch.stack([p[level] for p in per_camera], 1).flatten(0, 1)
            for level in range(len(per_camera[0]))
        ]

    def _boxes(self, hidden: torch.Tensor) -> torch.Tensor:
        delta = self.box_head(hidden)
        centre = torch.sigmoid(delta[..., :2] + self.reference)
        return torch.cat([centre, torch.sigmoid(delta[..., 2:])], dim=-1)

    def forward(self, images: torch.Tensor) -> dict:
        b, cams, _, height, width = images.shape
        if cams != self.num_cameras:
            raise ValueError(f"expected {self.num_cameras} cameras, got {cams}")
        pyramid = self._features(images)
        top = self.input_proj(pyramid[-1])  # [B * 8, d, h, w]
        d, h, w = top.shape[1:]
        pos = sine_position(grid_points(h, w, top.device), d).to(top.dtype)  # [h * w, d]
        tokens = top.flatten(2).transpose(1, 2).reshape(b, cams, h * w, d)
        position = pos[None, None] + self.camera_embed[None, :, None]  # [1, 8, h * w, d]
        fused = self.fusion((tokens + position).reshape(b, cams * h * w, d))
        fine = self.fine_proj(pyramid[-2])
        fh, fw = fine.shape[-2:]
        fine_pos = sine_position(grid_points(fh, fw, top.device), d).to(top.dtype)
        fine = fine.flatten(2).transpose(1, 2).reshape(b, cams, fh * fw, d)
        memory = torch.cat(
            [
                fused + (position + self.level_embed[0]).reshape(1, cams * h * w, d),
                (
                    fine + fine_pos[None, None] + self.camera_embed[None, :, None] + self.level_embed[1]
                ).flatten(1, 2),
            ],
            dim=1,
        )

        # queries: per camera, Q object queries (at their reference points) then L lane queries;
        # each camera's queries read that camera's fused tokens (which already saw the others)
        # and its finer features
        ref_pos = sine_position(torch.sigmoid(self.reference), d).to(top.dtype)  # [Q, d]
        q = torch.cat([self.object_queries + ref_pos, self.lane_queries], 0)  # [Q + L, d]
        q = (q[None] + self.camera_embed[:, None]).reshape(1, -1, d).expand(b, -1, -1)
        own = torch.arange(cams, device=top.device)
        key_camera = torch.cat([own.repeat_interleave(h * w), own.repeat_interleave(fh * fw)])
        mask = own.repeat_interleave(self.queries + self.num_lanes)[:, None] != key_camera[None]
        outputs = []
        for layer in self.decoder:
            q = layer(q, memory, memory_mask=mask)
            outputs.append(self.decoder_norm(q).reshape(b, cams, self.queries + self.num_lanes, d))
        last = outputs[-1]
        objects, lanes = last[:, :, : self.queries], last[:, :, self.queries :]
        out = {
            "logits": self.class_head(objects),
            "boxes": self._boxes(objects),
            "lanes": torch.sigmoid(self.lane_head(lanes)).reshape(
                b, cams, self.num_lanes, self.lane_points, 2
            ),
            "lane_logits": self.lane_exists_head(lanes).squeeze(-1),
        }
        fused_maps = fused.reshape(b * cams, h, w, d).permute(0, 3, 1, 2)
        log_depth = self.depth(fused_maps, pyramid[:-1], (height, width))
        out["depth"] = torch.exp(log_depth.clamp(-5, 6)).reshape(b, cams, height, width)
        if self.training:
            out["aux"] = [
                (self.class_head(o[:, :, : self.queries]), self._boxes(o[:, :, : self.queries]))
                for o in outputs[:-1]
            ]
        return out


@register("autonomous", "tiny")
def tiny(**kw) -> AutonomousNet:
    """A small CNN shared by the 8 cameras, d_model 64: minutes on 2 CPU cores at 64 x 96 px."""
    return AutonomousNet(**{"backbone": "tiny", "d_model": 64, "fusion_layers": 2, "decoder_layers": 2, **kw})


@register("autonomous", "full")
def full(**kw) -> AutonomousNet:
    """The seed's scale: ResNet-50 per camera, d_model 2048, 8 heads, 6 fusion and 6 decoder layers."""
    defaults = dict(
        backbone="resnet50",
        d_model=2048,
        heads=8,
        fusion_layers=6,
        decoder_layers=6,
        ff_dim=2048,
        dropout=0.1,
        queries=16,
        num_lanes=4,
        lane_points=20,
        depth_width=256,
    )
    return AutonomousNet(**{**defaults, **kw})


@register("autonomous", "convnext")
def convnext(**kw) -> AutonomousNet:
    """A transformers ConvNeXt (built from its config) shared by the cameras, d_model 256."""
    defaults = dict(backbone="convnext", d_model=256, heads=8, fusion_layers=4, decoder_layers=4, ff_dim=1024)
    return AutonomousNet(**{**defaults, **kw})
