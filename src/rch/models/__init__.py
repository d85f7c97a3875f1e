"""Networks by name, each with the layer RCH reads preset.

Names: ``deeplabv3_resnet50/101``, ``hrnet_w18/w48[_small]_fcn``, ``hrnet_w18/w48_ocr``,
``segformer_b0`` ... ``segformer_b5``, ``tiny`` (a CPU-sized CNN), ``smp:ARCH:ENCODER`` (any
segmentation_models_pytorch model), or ``package.module:factory`` (your own; give ``layer``).

Example:
    >>> from rch.models import build_model
    >>> built = build_model("tiny", num_classes=4)
    >>> built.layer, built.feature_channels
    ('encoder', 128)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from .tiny import TinySegNet
from .zoo import BuiltModel, deeplabv3, hrnet, import_model, load_weights, segformer, smp_model

__all__ = ["MODELS", "BuiltModel", "TinySegNet", "build_model", "load_weights", "split_outputs"]


def _tiny(num_classes: int, pretrained: str | None = None, width: int = 32) -> BuiltModel:
    model = TinySegNet(num_classes, width)
    if pretrained is not None:
        load_weights(model, pretrained)
    return BuiltModel(model, "encoder", None, 4 * width, 64, "stride-8 encoder output")


MODELS: dict[str, Callable[..., BuiltModel]] = {
    "tiny": _tiny,
    "deeplabv3_resnet50": partial(deeplabv3, 50),
    "deeplabv3_resnet101": partial(deeplabv3, 101),
    "hrnet_w18_small_fcn": partial(hrnet, 18, "fcn", timm_name="hrnet_w18_small_v2"),
    "hrnet_w18_small_ocr": partial(hrnet, 18, "ocr", timm_name="hrnet_w18_small_v2"),
    "hrnet_w18_fcn": partial(hrnet, 18, "fcn"),
    "hrnet_w48_fcn": partial(hrnet, 48, "fcn"),
    "hrnet_w18_ocr": partial(hrnet, 18, "ocr"),
    "hrnet_w48_ocr": partial(hrnet, 48, "ocr"),
    **{f"segformer_b{i}": partial(segformer, i) for i in range(6)},
}


def build_model(
    name: str, num_classes: int, pretrained: str | None = None, **options: Any
) -> BuiltModel:
    """Build a network by name (see the module docstring).

    Args:
        name: registry name, ``smp:ARCH:ENCODER``, or ``package.module:factory``.
        num_classes: K.
        pretrained: ``None`` (random init), ``"hub"`` (the library's ImageNet weights; needs
            network access) or a local weights file for the encoder.
        **options: builder options (``feature`` for HRNet; ``aux``/``embed_dim`` for smp;
            ``layer``/``select``/``feature_channels``/any factory kwargs for imports).

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    if name.startswith("smp:"):
        parts = name.split(":")
        if len(parts) != 3:
            raise KeyError(f"smp models are named 'smp:ARCH:ENCODER', got {name!r}")
        return smp_model(parts[1], parts[2], num_classes, pretrained, **options)
    if ":" in name:
        if "layer" not in options:
            raise ValueError(f"model {name!r} is imported; give layer= (the module RCH reads)")
        return import_model(name, num_classes, **options)
    if name not in MODELS:
        raise KeyError(
            f"unknown model {name!r}; choose one of {sorted(MODELS)}, 'smp:ARCH:ENCODER' or "
            "'package.module:factory'"
        )
    return MODELS[name](num_classes=num_classes, pretrained=pretrained, **options)


def split_outputs(output: Any) -> tuple[Any, Any]:
    """``(logits, aux_logits or None)`` from a model output: a tensor, a dict with ``"out"``
    (and ``"aux"``), a tuple/list, or an object with ``.logits`` (Hugging Face)."""
    if isinstance(output, dict):
        return output["out"], output.get("aux")
    if isinstance(output, (tuple, list)):
        return output[0], (output[1] if len(output) > 1 else None)
    if hasattr(output, "logits"):
        return output.logits, None
    return output, None
