"""attach / export on torchvision, smp, timm, Hugging Face transformers and hand-written models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rch
from rch import RCHAttachment, RCHError

K = 5


class HandWritten(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, K, 1)

    def forward(self, x):
        return F.interpolate(
            self.head(self.body(self.stem(x))),
            size=x.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )


class TimmSeg(nn.Module):
    """A timm features_only encoder (returns a list) with an FCN-style classifier."""

    def __init__(self):
        super().__init__()
        import timm

        self.encoder = timm.create_model(
            "resnet18", features_only=True, pretrained=False, out_indices=(2, 3)
        )
        self.classifier = nn.Conv2d(self.encoder.feature_info.channels()[-1], K, 1)

    def forward(self, x):
        return F.interpolate(
            self.classifier(self.encoder(x)[-1]),
            size=x.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )


def _torchvision():
    from torchvision.models.segmentation import deeplabv3_resnet50

    return deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=K, aux_loss=False)


def _smp_unet():
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, classes=K)


def _smp_segformer():
    import segmentation_models_pytorch as smp

    return smp.Segformer("mit_b0", encoder_weights=None, classes=K)


def _hf_segformer(hidden_states=False):
    """A tiny Hugging Face SegFormer from its config (random init, nothing downloaded)."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=K,
        output_hidden_states=hidden_states,
    )
    return SegformerForSemanticSegmentation(config)


def _hf_logits(out):
    """A SemanticSegmenterOutput's logits (stride 4) at the labels' size."""
    return F.interpolate(out.logits, size=(64, 64), mode="bilinear", align_corners=False)


# (factory, layer, select, expected in_channels, output -> logits)
MODELS = {
    "torchvision-deeplabv3": (_torchvision, "backbone", "out", 2048, lambda o: o["out"]),
    "torchvision-layer": (_torchvision, "backbone.layer3", None, 1024, lambda o: o["out"]),
    "smp-unet": (_smp_unet, "encoder", -1, 512, lambda o: o),
    "smp-segformer": (_smp_segformer, "encoder", -1, None, lambda o: o),
    "timm-encoder": (TimmSeg, "encoder", 1, 256, lambda o: o),
    "timm-submodule": (TimmSeg, "encoder.layer2", None, 128, lambda o: o),
    "hand-written": (HandWritten, "body", None, 16, lambda o: o),
    # the decoder's fuse conv; the encoder's output, a ModelOutput, read by attribute or from
    # its hidden states (the README's selector)
    "hf-segformer-decoder": (_hf_segformer, "decode_head.linear_fuse", None, 16, _hf_logits),
    "hf-segformer-encoder": (
        _hf_segformer,
        "segformer",
        lambda o: o.last_hidden_state,
        None,
        _hf_logits,
    ),
    "hf-segformer-hidden-states": (
        lambda: _hf_segformer(hidden_states=True),
        "segformer",
        lambda o: o.hidden_states[-1],
        None,
        _hf_logits,
    ),
}


def _batch(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, size, size, generator=g), torch.randint(
        0, K, (2, size, size), generator=g
    )


def _hook_counts(net: nn.Module) -> dict[str, int]:
    return {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in net.named_modules()}


@pytest.mark.parametrize("name", list(MODELS))
def test_attach_train_step_and_export_to_exact_baseline(name):
    factory, layer, select, channels, logits_of = MODELS[name]
    torch.manual_seed(0)
    net = factory()
    reference = factory()
    baseline_keys = list(reference.state_dict())
    x, y = _batch()
    model = rch.attach(
        net,
        layer,
        num_classes=K,
        select=select,
        embed_dim=16,
        example_input=x if channels is None else None,
    )
    if channels is not None:
        assert model.head.in_channels == channels
    assert isinstance(model, RCHAttachment) and model.model is net

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    logits = logits_of(model(x))
    out = model.rch_loss(logits, y)
    assert out.active and torch.isfinite(out.loss)
    (F.cross_entropy(logits, y) + out.loss).backward()
    assert model.head.projection[0].weight.grad.abs().sum() > 0
    feature_module = net.get_submodule(layer)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in feature_module.parameters())
    optimizer.step()
    assert int(model.head.step) == 1

    model.eval()
    with torch.no_grad():
        attached = logits_of(model(x))
    deployed = rch.export(model)
    assert deployed is net
    assert list(deployed.state_dict()) == baseline_keys
    assert not any(isinstance(m, rch.RCHHead) for m in deployed.modules())
    # the hooks a plain forward of the baseline leaves (none, but Hugging Face models install
    # their own output-capturing hooks on the first forward pass), not one more
    with torch.no_grad():
        reference.eval()(x)
    assert _hook_counts(deployed) == _hook_counts(reference)
    with torch.no_grad():
        assert torch.equal(logits_of(deployed(x)), attached)


def _three_steps(model: RCHAttachment, run) -> list[float]:
    """Three SGD steps of cross-entropy + RCH, the forward pass through ``run``."""
    x, y = _batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        logits = run(x)
        out = model.rch_loss(logits, y)
        (F.cross_entropy(logits, y) + out.loss).backward()
        optimizer.step()
        losses.append(out.loss.item())
    return losses


def test_torch_compile_trains_as_eager_and_exports():
    """A compiled attachment (the hook traced by dynamo; aot_eager: no C++ compiler needed)
    trains as the eager one does, and export strips RCH from inside the compiled wrapper."""
    torch.manual_seed(0)
    eager = rch.attach(HandWritten(), "body", num_classes=K, embed_dim=8)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(_three_steps(model, compiled), _three_steps(eager, eager))
    for (name, a), b in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    torch.testing.assert_close(model.head.prototypes, eager.head.prototypes)
    assert int(model.head.step) == 3

    deployed = rch.export(compiled)
    assert deployed is compiled and deployed._orig_mod is model.model
    assert _hook_counts(deployed._orig_mod) == _hook_counts(HandWritten())
    x, _ = _batch(1)
    deployed.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), eager.model(x))


def test_a_layer_inside_a_compiled_module_is_refused_with_the_fix():
    """Compiled code does not run hooks added after it was traced: the feature would never
    be captured. The compiled wrapper itself can be hooked (its call runs outside)."""
    x, y = _batch()
    net = torch.compile(HandWritten(), backend="aot_eager")
    net(x)
    for layer in ("body", "_orig_mod.body"):
        with pytest.raises(
            RCHError,
            match=r"inside a torch.compile'd module \(the model itself\).*"
            r"torch.compile\(rch.attach\(model",
        ):
            rch.attach(net, layer, num_classes=K)
    inner = HandWritten()
    inner.body = torch.compile(inner.body, backend="aot_eager")
    with pytest.raises(RCHError, match=r"inside a torch.compile'd module \('body'\)"):
        rch.attach(inner, "body._orig_mod.0", num_classes=K)
    model = rch.attach(inner, "body", num_classes=K, in_channels=16, embed_dim=8)
    logits = model(x)
    assert torch.isfinite(model.rch_loss(logits, y).loss)


def test_attached_outputs_are_bitwise_the_models():
    torch.manual_seed(0)
    net = HandWritten().eval()
    x, _ = _batch(1)
    with torch.no_grad():
        before = net(x)
        model = rch.attach(copy.deepcopy(net), "body", num_classes=K).eval()
        assert torch.equal(model(x), before)


def test_loss_before_forward_and_twice_raise():
    model = rch.attach(HandWritten(), "body", num_classes=K)
    x, y = _batch()
    with pytest.raises(RCHError, match="no feature captured from layer 'body'"):
        model.rch_loss(torch.randn(2, K, 64, 64), y)
    logits = model(x)
    model.rch_loss(logits, y)
    with pytest.raises(RCHError, match="one loss call per forward pass"):
        model.rch_loss(logits, y)


def test_projection_gradient_comes_after_the_layers_above_the_feature():
    """The hook embeds the feature during the forward pass, so in the backward pass the
    projection's gradient of F is computed after the network's layers above F (when their
    activations are freed), not first; the loss and every gradient are as if the head had
    embedded the feature inside rch_loss."""
    torch.manual_seed(0)
    net = HandWritten()
    model = rch.attach(copy.deepcopy(net), "body", num_classes=K, embed_dim=8)
    late = copy.deepcopy(model)
    x, y = _batch()
    order: list[str] = []
    model.head.projection[0].weight.register_hook(lambda g: order.append("projection"))
    model.model.head.weight.register_hook(lambda g: order.append("above F"))
    model.model.body[0].weight.register_hook(lambda g: order.append("below F"))
    logits = model(x)
    made_early = model._hook.embedding is not None  # in the forward pass
    out = model.rch_loss(logits, y)
    (F.cross_entropy(logits, y) + out.loss).backward()
    assert order == ["above F", "projection", "below F"]
    assert made_early
    # the same loss and gradients when the embedding is made inside rch_loss
    late._hook.head = None  # the hook keeps the feature; rch_loss embeds it
    logits_late = late(x)
    out_late = late.rch_loss(logits_late, y)
    (F.cross_entropy(logits_late, y) + out_late.loss).backward()
    torch.testing.assert_close(out.loss, out_late.loss)
    for (name, a), b in zip(model.named_parameters(), late.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    # no embedding is made in evaluation or without gradients
    with torch.no_grad():
        model(x)
    assert model._hook.embedding is None and model._hook.feature is not None
    model.eval()
    model(x)
    assert model._hook.embedding is None


class Concat(nn.Module):
    """Float32 out whatever comes in, as an upsampling under autocast (HRNet's resize-concat)."""

    def forward(self, x):
        return torch.cat([x, 2 * x], dim=1).float()


def test_a_training_forward_keeps_the_embedding_not_the_features_base():
    """A feature that is a view (here a channel slice of a concatenation) does not keep its
    base alive once embedded: under autocast the projection saves a cast copy, and nothing
    else holds the float32 concatenation (ReLU saves its output, not its input)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), Concat(), nn.ReLU(), nn.Conv2d(16, K, 1))
    model = rch.attach(net, "1", num_classes=K, in_channels=8, select=lambda t: t[:, :8])
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, K, (2, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert model.feature is None and model._hook.embedding is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.rch_loss(logits, y)
    (F.cross_entropy(logits.float(), y) + out.loss).backward()
    assert model.head.projection[0].weight.grad is not None
    with torch.no_grad():  # without an embedding the feature is kept as it was
        model(x)
    assert model.feature is not None and model.feature.shape == (2, 8, 8, 8)


def test_a_feature_modified_in_place_is_embedded_after_the_forward_pass():
    """A network that changes the hooked output in place (here an in-place ReLU after the
    hooked BN) would break the early embedding's backward pass. RCH notices, warns, and
    embeds the feature as it is after the forward pass, as if it had only kept it: the
    same loss, gradients and BN statistics as a hook that never embeds early."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(True), nn.Conv2d(8, K, 1)
    )
    model = rch.attach(net, "1", num_classes=K, in_channels=8, embed_dim=8)
    late = copy.deepcopy(model)
    late._hook.head = None
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, K, (2, 8, 8))
    results = []
    for m in (model, late):
        logits = m(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = m.rch_loss(logits, y)
        (F.cross_entropy(logits, y) + out.loss).backward()
        results.append((out.loss, caught))
    (loss, caught), (loss_late, caught_late) = results
    assert [str(w.message) for w in caught_late] == []
    assert len(caught) == 1 and "modified in place" in str(caught[0].message)
    torch.testing.assert_close(loss, loss_late)
    for (name, a), b in zip(model.named_parameters(), late.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), b in zip(model.named_buffers(), late.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)  # the projection's BN updated once


def test_unknown_layer_lists_names():
    with pytest.raises(KeyError, match=r"no submodule named 'bod'.*body"):
        rch.attach(HandWritten(), "bod", num_classes=K)


def test_double_attach_rejected():
    model = rch.attach(HandWritten(), "body", num_classes=K)
    with pytest.raises(RCHError, match="already"):
        rch.attach(model, "model.body", num_classes=K)


def test_selector_errors_name_the_layer():
    torch.manual_seed(0)
    model = rch.attach(TimmSeg(), "encoder", num_classes=K, in_channels=256, select="out")
    with pytest.raises(RCHError, match="layer 'encoder' returned list; cannot select key 'out'"):
        model(_batch()[0])
    model = rch.attach(TimmSeg(), "encoder", num_classes=K, in_channels=256)
    with pytest.raises(RCHError, match=r"must be a \(B, C, h, w\) tensor; got list"):
        model(_batch()[0])


def test_callable_selector_and_uninferable_channels():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 8)
            self.cls = nn.Linear(8, K)

        def forward(self, x):
            b, _, h, w = x.shape
            t = self.proj(x.flatten(2).transpose(1, 2))  # (B, N, C) tokens
            return self.cls(t).transpose(1, 2).reshape(b, K, h, w)

    with pytest.raises(RCHError, match="pass in_channels= or example_input="):
        rch.attach(Tokens(), "proj", num_classes=K)
    x, y = _batch(size=8)
    model = rch.attach(
        Tokens(),
        "proj",
        num_classes=K,
        example_input=x,
        select=lambda t: t.transpose(1, 2).reshape(2, 8, 8, 8),
    )
    assert model.head.in_channels == 8
    logits = model(x)
    model.rch_loss(logits, y).loss.backward()


def test_export_removes_heads_nested_in_a_container():
    net = HandWritten()
    holder = nn.ModuleDict({"seg": rch.attach(net, "body", num_classes=K)})
    rch.export(holder)
    assert holder["seg"] is net
    assert all(len(m._forward_hooks) == 0 for m in holder.modules())


def test_state_dict_of_attachment_round_trips():
    torch.manual_seed(0)
    model = rch.attach(HandWritten(), "body", num_classes=K, embed_dim=8)
    x, y = _batch()
    model.rch_loss(model(x), y).loss.backward()
    state = model.state_dict()
    assert "head.prototypes" in state and "model.body.0.weight" in state
    other = rch.attach(HandWritten(), "body", num_classes=K, embed_dim=8)
    other.load_state_dict(state)
    assert int(other.head.step) == 1
    torch.testing.assert_close(other.head.prototypes, model.head.prototypes, rtol=0, atol=0)
