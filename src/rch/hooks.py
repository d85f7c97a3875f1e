"""Attach an RCHHead to any model by naming the layer whose output is ``F``; export removes it.

The feature is captured with a forward hook, so the user's model code is not edited and its
outputs are untouched. :func:`attach` returns an :class:`RCHAttachment` module that holds the
model and the head side by side (so ``parameters()``, ``.to()``, ``state_dict`` and DDP cover
both); :func:`export` strips the hook and returns exactly the baseline network.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import RCHError
from .head import RCHHead, RCHHeadOutput

__all__ = ["FeatureSelector", "RCHAttachment", "attach", "export"]

FeatureSelector = int | str | Callable[[Any], Tensor] | None


def _select(output: Any, select: FeatureSelector, layer: str) -> Tensor:
    """Pick the feature tensor out of a layer's output (tensor, sequence, mapping)."""
    if callable(select):
        picked = select(output)
    elif select is None:
        picked = output
    elif isinstance(select, str):
        if not isinstance(output, Mapping) or select not in output:
            keys = list(output.keys()) if isinstance(output, Mapping) else None
            raise RCHError(
                f"layer {layer!r} returned {type(output).__name__}; cannot select key "
                f"{select!r}" + (f" (keys: {keys})." if keys is not None else ".")
            )
        picked = output[select]
    else:
        if not isinstance(output, Sequence) or isinstance(output, (str, bytes)):
            raise RCHError(
                f"layer {layer!r} returned {type(output).__name__}; cannot select index {select}."
            )
        picked = output[select]
    if not isinstance(picked, Tensor) or picked.ndim != 4:
        what = tuple(picked.shape) if isinstance(picked, Tensor) else type(picked).__name__
        raise RCHError(
            f"the feature selected from layer {layer!r} must be a (B, C, h, w) tensor; got "
            f"{what}. Pass select= (an index, a key or a function) to pick or reshape it."
        )
    return picked


class _FeatureHook:
    """Forward hook that keeps the last selected feature; it never changes the output.

    Given a ``head`` in training mode, with gradients on, it also projects the feature to
    the head's embedding right away (see :meth:`RCHAttachment.rch_loss` for why), and then
    keeps only a weak reference to the feature: a feature that is a view (a channel slice of
    a concatenation, say) would otherwise keep its whole base tensor alive until the loss.
    It notes the feature's version counter and the projection's buffers (BN statistics),
    for the case where the network modifies the feature in place afterwards.
    """

    def __init__(self, layer: str, select: FeatureSelector, head: RCHHead | None = None) -> None:
        self.layer, self.select, self.head = layer, select, head
        self._feature: Tensor | weakref.ref[Tensor] | None = None
        self.embedding: Tensor | None = None
        self.version = 0
        self.buffers: list[Tensor] = []

    @property
    def feature(self) -> Tensor | None:
        """The last selected feature (``None`` if none, or if only its embedding is kept and
        nothing else holds it any more)."""
        if isinstance(self._feature, weakref.ref):
            return self._feature()
        return self._feature

    @property
    def captured(self) -> bool:
        """True from a forward pass until :meth:`clear` (the feature itself may be gone)."""
        return self._feature is not None

    def clear(self) -> None:
        self._feature, self.embedding, self.buffers = None, None, []

    def modified(self) -> bool:
        """True if the embedded feature was modified in place after the layer returned it."""
        feature = self.feature
        return (
            self.embedding is not None and feature is not None and feature._version != self.version
        )

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        feature = _select(output, self.select, self.layer)
        self.embedding, self.buffers = None, []
        if self.head is not None and self.head.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.buffers = [b.clone() for b in self.head.projection.buffers()]
            self.version = feature._version
            self.embedding = self.head.embed(feature)
            self._feature = weakref.ref(feature)
        else:
            self._feature = feature


class RCHAttachment(nn.Module):
    """A model with an RCH head attached: ``forward`` is the model's, untouched.

    Holds the user's model (``.model``) and the head (``.head``) as children, so
    ``parameters()``, ``.to()``, ``state_dict()`` and DDP cover both; the model's own
    structure is not changed (a forward hook on ``layer`` captures the feature).

    Attributes:
        model: the user's model.
        head: the :class:`~rch.head.RCHHead`.
        layer: dotted name of the hooked module.
    """

    def __init__(
        self, model: nn.Module, head: RCHHead, layer: str, select: FeatureSelector
    ) -> None:
        super().__init__()
        self.model, self.head, self.layer = model, head, layer
        self._hook = _FeatureHook(layer, select, head)
        self._handle = model.get_submodule(layer).register_forward_hook(self._hook)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model; its output is returned unchanged and the feature is kept."""
        return self.model(*args, **kwargs)

    @property
    def feature(self) -> Tensor | None:
        """The feature captured by the last forward pass (``None`` before one, or after
        :meth:`rch_loss` consumed it). After a training forward pass it is only weakly held
        (its embedding is kept instead), so it is ``None`` once nothing else holds it."""
        return self._hook.feature

    def rch_loss(
        self, seg_logits: Tensor, labels: Tensor, loss_mask: Tensor | None = None
    ) -> RCHHeadOutput:
        """RCH loss of the last forward pass; add its ``.loss`` to the segmentation loss.

        ``loss_mask`` (``(B, H, W)`` bool, optional): the pixels whose loss counts, e.g. the
        ones the segmentation loss's OHEM keeps; the statistics still use every labelled pixel.

        In a training forward pass (head in training mode, gradients on) the hook projects
        the feature as soon as the layer returns it, so the projection's autograd node comes
        before the rest of the network's. The backward pass runs later nodes first, so the
        projection's gradient of ``F`` (a tensor as large as ``F``) is computed after the
        network's own layers above ``F`` have freed their activations, not at the start of
        the backward pass when every activation is still held. The loss is the same.

        Raises:
            RCHError: no forward pass ran since the last call.
        """
        hook = self._hook
        feature, embedding = hook.feature, hook.embedding
        if not hook.captured:
            raise RCHError(
                f"no feature captured from layer {self.layer!r}: run the model's forward pass "
                "before asking for the RCH loss (one loss call per forward pass)."
            )
        if hook.modified():
            # the projection saved the feature for its backward pass, and the network has
            # changed it in place since (an in-place ReLU, `+=`): that backward would fail.
            # Embed the feature as it is now instead, as if the hook had only kept it, with
            # the projection's BN statistics as they were before the early embedding.
            warnings.warn(
                f"the feature of layer {self.layer!r} is modified in place after the layer "
                "returns it (e.g. by an in-place ReLU or +=); RCH embeds it after the forward "
                "pass instead, which loses the lower memory peak of embedding it at once. "
                "Hook a layer whose output is not modified in place to keep it.",
                stacklevel=2,
            )
            with torch.no_grad():
                for saved, live in zip(hook.buffers, self.head.projection.buffers(), strict=True):
                    live.copy_(saved)
            embedding = None
        hook.clear()
        if embedding is None:
            assert feature is not None  # held strongly when no embedding was made
            embedding = self.head.embed(feature)
        out: RCHHeadOutput = self.head.forward_embedded(embedding, seg_logits, labels, loss_mask)
        return out

    def rch_check(self) -> None:
        """Raise if the value checks of the head's ``validate="deferred"`` failed (see
        :meth:`RCHHead.check`): call it once a step, before the optimiser step."""
        self.head.check()

    def export(self) -> nn.Module:
        """The user's model with the hook removed: exactly the baseline network."""
        return export(self)


def _infer_channels(module: nn.Module) -> int | None:
    """Output channels of the last conv / norm registered inside ``module`` (a best guess)."""
    found = None
    for sub in module.modules():
        if isinstance(sub, (nn.Conv2d, nn.ConvTranspose2d)):
            found = sub.out_channels
        elif isinstance(sub, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.InstanceNorm2d)):
            found = sub.num_features
        elif isinstance(sub, nn.GroupNorm):
            found = sub.num_channels
    return found


def attach(
    model: nn.Module,
    layer: str,
    num_classes: int | None = None,
    *,
    head: RCHHead | None = None,
    in_channels: int | None = None,
    select: FeatureSelector = None,
    example_input: Any = None,
    **head_kwargs: Any,
) -> RCHAttachment:
    """Attach an RCH head to ``model``, reading the output of submodule ``layer``.

    Args:
        model: any ``nn.Module``; it is not edited.
        layer: dotted name of the submodule whose output is the feature ``F`` (as in
            ``model.named_modules()``, e.g. ``"backbone.layer4"``).
        num_classes: ``K``; required unless ``head`` is given.
        head: a ready :class:`RCHHead`; otherwise one is built from ``num_classes``,
            ``in_channels`` and ``head_kwargs``.
        in_channels: channels of ``F``. If omitted, found by one forward pass of
            ``example_input`` (no gradient), or else from the last conv / norm in ``layer``.
        select: picks ``F`` from a layer that returns a list/tuple (an index), a dict (a key)
            or anything else (a function returning a ``(B, C, h, w)`` tensor).
        example_input: input for the dry run that finds ``in_channels``.
        **head_kwargs: passed to :class:`RCHHead` (``embed_dim``, ``tau``, ``loss_weight``...).

    Returns:
        An :class:`RCHAttachment`: call it as the model, then
        ``attached.rch_loss(seg_logits, labels).loss`` for the loss to add.

    Raises:
        KeyError: ``layer`` is not a submodule name (the message lists close names).
        RCHError: ``model`` is already an attachment, ``layer`` is inside a
            ``torch.compile``'d module (compile the attachment instead), or channels cannot
            be inferred.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import rch
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> model = rch.attach(net, "1", num_classes=4, in_channels=8, embed_dim=16)
        >>> x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8))
        >>> logits = model(x)
        >>> loss = nn.functional.cross_entropy(logits, y) + model.rch_loss(logits, y).loss
        >>> loss.backward()
        >>> deployed = rch.export(model)
        >>> list(deployed.state_dict())
        ['0.weight', '0.bias', '2.weight', '2.bias']
    """
    modules = dict(model.named_modules())
    _check_not_compiled(modules, layer)
    if layer not in modules or layer == "":
        close = [n for n in modules if n and (layer in n or n in layer)][:10]
        raise KeyError(
            f"model has no submodule named {layer!r}; "
            + (f"close names: {close}" if close else f"names look like: {list(modules)[1:11]}")
        )
    if isinstance(model, RCHAttachment):
        raise RCHError("model already has an RCH head attached; export() it first.")
    target = modules[layer]
    if head is None:
        if num_classes is None:
            raise ValueError("attach() needs num_classes when no head is given.")
        if in_channels is None:
            in_channels = _channels_by_dry_run(
                model, target, _FeatureHook(layer, select), example_input
            )
        if in_channels is None:
            in_channels = _infer_channels(target)
        if in_channels is None:
            raise RCHError(
                f"cannot tell how many channels layer {layer!r} outputs; pass in_channels= or "
                "example_input=."
            )
        head = RCHHead(in_channels, num_classes, **head_kwargs)
        ref = next(iter(model.parameters()), None)
        if ref is not None:
            head = head.to(ref.device)
    return RCHAttachment(model, head, layer, select)


def _check_not_compiled(modules: Mapping[str, nn.Module], layer: str) -> None:
    """Refuse a layer inside a ``torch.compile``'d module (``modules``: the model's
    ``named_modules``): compiled code does not run forward hooks added after it was traced,
    so the feature would never be captured."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded once anything compiles
    compiled = getattr(eval_frame, "OptimizedModule", None)
    if compiled is None:
        return
    parts = layer.split(".")
    for depth in range(len(parts)):
        outer = modules.get(".".join(parts[:depth]))
        if outer is None:
            return
        if isinstance(outer, compiled):
            where = repr(".".join(parts[:depth])) if depth else "the model itself"
            raise RCHError(
                f"layer {layer!r} is inside a torch.compile'd module ({where}): compiled code "
                "does not run hooks added after it was traced. Attach RCH to the uncompiled "
                "model and compile the attachment: torch.compile(rch.attach(model, ...))."
            )


def _channels_by_dry_run(
    model: nn.Module, target: nn.Module, hook: _FeatureHook, example_input: Any
) -> int | None:
    if example_input is None:
        return None
    handle = target.register_forward_hook(hook)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        handle.remove()
        model.train(was_training)
    feature = hook.feature
    hook.clear()
    return None if feature is None else int(feature.shape[1])


def export(model: nn.Module) -> nn.Module:
    """Strip RCH from ``model``: return the baseline network with every RCH hook removed.

    ``model`` may be an :class:`RCHAttachment` (its ``.model`` is returned), a model that
    contains attachments or heads somewhere inside, or a ``DistributedDataParallel`` wrapper
    of either. The result's ``state_dict`` keys are those of a fresh model of the same
    architecture, and its outputs are bitwise those of the attached model.

    Example:
        >>> from torch import nn
        >>> import rch
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1))
        >>> attached = rch.attach(net, "0", num_classes=4, in_channels=4, embed_dim=8)
        >>> rch.export(attached) is net
        True
    """
    inner = getattr(model, "module", None)
    if isinstance(model, nn.parallel.DistributedDataParallel) and isinstance(inner, nn.Module):
        model = inner
    for module in model.modules():
        for key, fn in list(module._forward_hooks.items()):
            if isinstance(fn, _FeatureHook):
                fn.clear()
                del module._forward_hooks[key]
    if isinstance(model, RCHAttachment):
        return model.model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, RCHAttachment):
                setattr(module, name, child.model)
            elif isinstance(child, RCHHead):
                delattr(module, name)
    return model
