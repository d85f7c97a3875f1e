"""The paper's networks and any smp model, each with the layer RCH reads preset.

Every builder returns a :class:`BuiltModel`: the network (its ``forward(x)`` returns
``{"out": logits, "aux": aux_logits}`` at the input resolution, or a tensor when it has no
auxiliary head) and where its RCH feature ``F`` is.

Weights: ``pretrained=None`` initialises randomly; ``"hub"`` asks the library that defines the
encoder for its ImageNet weights (network access needed); any other string is a local file
(``.pth``/``.pt``/``.bin``/``.safetensors``) loaded into the encoder.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hooks import FeatureSelector
from .heads import ChannelSlice, FCNHead, OCRHead, ResizeConcat

__all__ = ["BuiltModel", "import_model", "load_weights", "smp_model"]


@dataclass
class BuiltModel:
    """A network and where RCH reads its feature.

    Attributes:
        model: the segmentation network.
        layer: dotted name of the module whose output holds ``F``.
        select: how to pick ``F`` from that output (index, key, callable or ``None``).
        feature_channels: channels of ``F``.
        embed_dim: the embedding width RCH uses by default for this network.
        feature_note: which feature this is, in words.
    """

    model: nn.Module
    layer: str
    select: FeatureSelector
    feature_channels: int
    embed_dim: int
    feature_note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def load_weights(module: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a local checkpoint into ``module`` (non-strict); returns (missing, unexpected).

    Unwraps ``state_dict``/``model`` entries and a ``module.`` prefix.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read, or none of its keys match the module.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file: say which
        raise ValueError(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = module.load_state_dict(state, strict=False)
    own = set(module.state_dict())
    if not own & set(state):
        raise ValueError(f"no parameter name in {path} matches {type(module).__name__}")
    return list(result.missing_keys), list(result.unexpected_keys)


def _double_if_needed(width: int, num_classes: int) -> int:
    return 2 * width if num_classes > width else width


# ---------------------------------------------------------------- DeepLabV3 (torchvision)


def deeplabv3(depth: int, num_classes: int, pretrained: str | None = None) -> BuiltModel:
    """DeepLabV3-ResNet{50,101} with the FCN auxiliary head; RCH reads the encoder output."""
    from torchvision.models import segmentation

    builder = getattr(segmentation, f"deeplabv3_resnet{depth}")
    model = builder(
        weights=None,
        weights_backbone="IMAGENET1K_V1" if pretrained == "hub" else None,
        num_classes=num_classes,
        aux_loss=True,
    )
    if pretrained not in (None, "hub"):
        load_weights(model.backbone, pretrained)
    return BuiltModel(
        model, "backbone", "out", 2048, 256, "ResNet layer4 output (stride 8), the encoder output"
    )


# ---------------------------------------------------------------- HRNet + FCN / OCR (timm)


class HRNetSeg(nn.Module):
    """HRNetV2: timm's HRNet branches, resize-concat (``concat``), and an FCN or OCR head."""

    def __init__(
        self, width: int, num_classes: int, head: str, pretrained: str | None, name: str = ""
    ) -> None:
        import timm

        super().__init__()
        kwargs: dict[str, Any] = {}
        if pretrained not in (None, "hub"):
            kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained)}
        self.backbone = timm.create_model(
            name or f"hrnet_w{width}",
            pretrained=pretrained is not None,
            features_only=True,
            feature_location="",
            out_indices=(1, 2, 3, 4),
            **kwargs,
        )
        info: Any = self.backbone.feature_info
        self.branch_channels: list[int] = list(info.channels())
        self.concat = ResizeConcat()
        total = sum(self.branch_channels)
        self.head_kind = head
        if head == "ocr":
            self.head: nn.Module = OCRHead(total, num_classes)
        else:
            self.head = FCNHead(total, num_classes, channels=total)
            self.aux = FCNHead(total, num_classes, channels=min(256, total))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.concat(self.backbone(x))
        if self.head_kind == "ocr":
            out, aux = self.head(feats)
        else:
            out, aux = self.head(feats), self.aux(feats)
        size = x.shape[-2:]
        return {
            "out": F.interpolate(out, size=size, mode="bilinear", align_corners=False),
            "aux": F.interpolate(aux, size=size, mode="bilinear", align_corners=False),
        }


def hrnet(
    width: int,
    head: str,
    num_classes: int,
    pretrained: str | None = None,
    feature: str = "branch2",
    timm_name: str = "",
) -> BuiltModel:
    """HRNet-W{width} + FCN or OCR head.

    ``feature="branch2"`` (default, the reference code): the second-resolution branch after
    resize-concat, D = its width (doubled when K exceeds it). ``"concat"`` (the paper's
    "encoder output"): all branches concatenated, D = 256.
    """
    model = HRNetSeg(width, num_classes, head, pretrained, timm_name)
    c = model.branch_channels
    if feature == "branch2":
        select: FeatureSelector = ChannelSlice(c[0], c[0] + c[1])
        return BuiltModel(
            model,
            "concat",
            select,
            c[1],
            _double_if_needed(c[1], num_classes),
            "second-resolution branch after resize-concat (reference code)",
        )
    if feature == "concat":
        return BuiltModel(model, "concat", None, sum(c), 256, "all HRNet branches, resize-concat")
    raise ValueError(f"hrnet feature must be 'branch2' or 'concat', got {feature!r}")


# ---------------------------------------------------------------- smp: SegFormer and the rest


class SMPSeg(nn.Module):
    """An smp model (``.net``) with an optional auxiliary FCN head on the encoder's
    second-deepest stage; returns ``{"out", "aux"}`` when the aux head exists."""

    def __init__(self, net: nn.Module, num_classes: int, aux: bool) -> None:
        super().__init__()
        self.net = net
        encoder: Any = net.encoder
        channels = list(encoder.out_channels)
        self.aux = (
            FCNHead(channels[-2], num_classes, channels=min(256, channels[-2])) if aux else None
        )

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        net: Any = self.net
        features = net.encoder(x)
        out = net.segmentation_head(net.decoder(features))
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.aux is None:
            return out  # type: ignore[no-any-return]
        aux = F.interpolate(
            self.aux(features[-2]), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        return {"out": out, "aux": aux}


def smp_model(
    arch: str,
    encoder: str,
    num_classes: int,
    pretrained: str | None = None,
    aux: bool = True,
    embed_dim: int = 256,
) -> BuiltModel:
    """Any segmentation_models_pytorch architecture/encoder; RCH reads the deepest encoder
    stage (``net.encoder``, last item)."""
    import segmentation_models_pytorch as smp

    net = smp.create_model(
        arch,
        encoder_name=encoder,
        encoder_weights="imagenet" if pretrained == "hub" else None,
        classes=num_classes,
    )
    if pretrained not in (None, "hub"):
        load_weights(net.encoder, pretrained)
    channels = int(net.encoder.out_channels[-1])
    return BuiltModel(
        SMPSeg(net, num_classes, aux),
        "net.encoder",
        -1,
        channels,
        embed_dim,
        f"{encoder} deepest stage (the encoder output)",
    )


def segformer(variant: int, num_classes: int, pretrained: str | None = None) -> BuiltModel:
    """SegFormer MiT-B{variant} (smp); RCH reads the last MiT stage (the encoder output)."""
    return smp_model("segformer", f"mit_b{variant}", num_classes, pretrained, aux=True)


# ---------------------------------------------------------------- user models


def import_model(
    target: str,
    num_classes: int,
    layer: str,
    select: FeatureSelector = None,
    feature_channels: int | None = None,
    embed_dim: int = 256,
    **kwargs: Any,
) -> BuiltModel:
    """A user's model from ``"package.module:factory"``, called as
    ``factory(num_classes=K, **kwargs)``; ``layer`` names the module whose output is ``F``."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"model import path must look like 'package.module:factory', got {target!r}"
        )
    try:
        factory: Callable[..., nn.Module] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import model factory {target!r}: {exc}") from exc
    model = factory(num_classes=num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{target} returned {type(model).__name__}, not an nn.Module")
    return BuiltModel(
        model, layer, select, feature_channels or 0, embed_dim, f"{layer} of {target}"
    )
