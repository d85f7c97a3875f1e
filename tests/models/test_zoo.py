"""Every preset network builds, trains with RCH attached, and exports to the exact baseline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rch
from rch.models import MODELS, build_model, load_weights, split_outputs

PRESETS = [*sorted(MODELS), "smp:Unet:resnet18", "smp:FPN:mobilenet_v2"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_with_rch_and_exports_to_the_baseline(name):
    torch.manual_seed(0)
    k = 5
    built = build_model(name, k)
    model = rch.attach(
        built.model,
        built.layer,
        k,
        select=built.select,
        in_channels=built.feature_channels,
        embed_dim=built.embed_dim,
    )
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, k, (2, 64, 64))
    logits, aux = split_outputs(model(x))
    assert logits.shape == (2, k, 64, 64)
    assert aux is None or aux.shape == (2, k, 64, 64)
    out = model.rch_loss(logits, y)
    assert out.active and torch.isfinite(out.loss)
    (nn.functional.cross_entropy(logits, y) + out.loss).backward()
    head_grad = model.head.projection[0].weight.grad
    assert head_grad is not None and torch.isfinite(head_grad).all() and head_grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        attached = split_outputs(model(x))[0]
    head_tensors = {id(t) for t in model.head.state_dict(keep_vars=True).values()}
    deployed = rch.export(model)
    torch.manual_seed(1)
    fresh = build_model(name, k).model
    assert list(deployed.state_dict()) == list(fresh.state_dict())
    assert not head_tensors & {id(t) for t in deployed.state_dict(keep_vars=True).values()}
    with torch.no_grad():
        assert torch.equal(split_outputs(deployed(x))[0], attached)


def test_hrnet_feature_choice():
    ref = build_model("hrnet_w18_small_ocr", 19)
    assert ref.layer == "concat" and ref.feature_channels == 36 and ref.embed_dim == 36
    assert build_model("hrnet_w18_small_ocr", 59).embed_dim == 72  # doubled when K > width
    full = build_model("hrnet_w18_small_fcn", 19, feature="concat")
    assert full.feature_channels == 18 + 36 + 72 + 144 and full.select is None
    with pytest.raises(ValueError, match="branch2"):
        build_model("hrnet_w18_small_fcn", 19, feature="stage4")


def test_local_pretrained_weights_are_loaded(tmp_path):
    source = build_model("tiny", 3).model
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}},
        tmp_path / "w.pth",
    )
    loaded = build_model("tiny", 3, pretrained=str(tmp_path / "w.pth")).model
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights file"):
        load_weights(loaded, tmp_path / "bad.pth")
    torch.save({"other": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="no parameter name"):
        load_weights(loaded, tmp_path / "foreign.pth")
    with pytest.raises(FileNotFoundError):
        build_model("tiny", 3, pretrained=str(tmp_path / "missing.pth"))


def test_user_model_by_import_path():
    built = build_model("tests.models.user_net:make", 4, layer="body", width=6)
    assert built.layer == "body"
    model = rch.attach(built.model, built.layer, 4, example_input=torch.zeros(1, 3, 8, 8))
    assert model.head.in_channels == 6
    with pytest.raises(ValueError, match="give layer="):
        build_model("tests.models.user_net:make", 4)
    with pytest.raises(ValueError, match="cannot import model factory"):
        build_model("tests.models.user_net:nope", 4, layer="body")


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown model 'resnet'.*deeplabv3_resnet101"):
        build_model("resnet", 3)
    with pytest.raises(KeyError, match="smp:ARCH:ENCODER"):
        build_model("smp:Unet", 3)


def test_split_outputs_accepts_the_usual_shapes():
    t = torch.zeros(1)

    class HF:
        logits = t

    assert split_outputs(t) == (t, None)
    assert split_outputs({"out": t, "aux": t})[1] is t
    assert split_outputs((t, t))[1] is t
    assert split_outputs(HF())[0] is t
