"""Training runs end to end, resumes exactly, exports the baseline, and reports clearly."""

from __future__ import annotations

import json

import pytest
import torch

from rch.errors import RCHError
from rch.models import build_model
from rch.train import build_network, export_checkpoint, load_checkpoint, save_checkpoint, train
from rch.train.config import apply_overrides
from rch.train.logger import read_metrics

from ..conftest import use_gpu_path
from .helpers import tiny_config


def test_a_run_writes_checkpoint_metrics_and_scores(tmp_path):
    result = train(tiny_config(tmp_path), progress=False)
    run = result.run_dir
    assert result.iterations == 4 and result.eval is not None
    assert {p.name for p in run.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "eval.json",
        "cost.json",
        "checkpoints",
        "tensorboard",
    }
    train_logs = read_metrics(run, "train")
    assert [r["iter"] for r in train_logs] == [1, 2, 3, 4]
    assert all(r["rch"] > 0 and r["seg"] > 0 and "aux" in r for r in train_logs)
    assert train_logs[0]["lr"] == pytest.approx(0.01)
    val = read_metrics(run, "val")
    assert len(val) == 1 and 0 <= val[0]["mIoU"] <= 1
    scores = json.loads((run / "eval.json").read_text())
    assert set(scores["IoU"]) == set(result.eval.classes)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["iter"] == 4 and int(state["model"]["head.step"]) == 4
    with pytest.raises(RCHError, match="exists; pass resume"):
        train(tiny_config(tmp_path), progress=False)


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    cfg = tiny_config(tmp_path, train={"iters": 6, "ckpt_every": 3})
    full = train(apply_overrides(cfg, ["name=full"]), progress=False)
    part = apply_overrides(cfg, ["name=part"])
    stopped = train(part, progress=False, stop_after=3)
    assert stopped.iterations == 3 and stopped.eval is None
    resumed = train(part, resume=True, progress=False)
    a = load_checkpoint(full.run_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(resumed.run_dir / "checkpoints" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    strip = [{k: v for k, v in r.items() if k != "s_per_iter"} for r in read_metrics(full.run_dir)]
    again = [
        {k: v for k, v in r.items() if k != "s_per_iter"} for r in read_metrics(resumed.run_dir)
    ]
    assert strip == again
    with pytest.raises(RCHError, match="no checkpoint"):
        train(apply_overrides(cfg, ["name=never"]), resume=True, progress=False)


def test_cached_data_trains_exactly_like_files(tmp_path):
    """``data.cache`` only changes where the decoded samples come from."""
    cfg = tiny_config(tmp_path, train={"iters": 3})
    plain = train(apply_overrides(cfg, ["name=plain"]), progress=False)
    cached = train(apply_overrides(cfg, ["name=cached", "data.cache=true"]), progress=False)
    a = load_checkpoint(plain.run_dir / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(cached.run_dir / "checkpoints" / "last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert plain.eval is not None and cached.eval is not None
    assert torch.equal(plain.eval.confusion, cached.eval.confusion)


def test_export_gives_the_baseline_state_dict(tmp_path):
    result = train(tiny_config(tmp_path, train={"iters": 2}), progress=False)
    model = export_checkpoint(result.run_dir, tmp_path / "deploy.pt")
    state_dict = torch.load(tmp_path / "deploy.pt", weights_only=True)
    meta = json.loads((tmp_path / "deploy.json").read_text())
    fresh = build_model(meta["model"]["name"], meta["num_classes"], **meta["model"]["options"])
    fresh = fresh.model
    assert list(state_dict) == list(fresh.state_dict())
    fresh.load_state_dict(state_dict)
    trained = result.network.base.eval()
    fresh.eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(fresh(x)["out"], trained(x)["out"])
        assert torch.equal(model(x)["out"], trained(x)["out"])
    assert meta["classes"][0] == "sky" and meta["model"] == {
        "name": "tiny",
        "options": {"width": 8},
    }


def test_checkpoints_are_atomic_and_corruption_is_reported(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"iter": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RCHError, match="corrupt or truncated"):
        load_checkpoint(path)
    torch.save({"iter": 1}, path)
    with pytest.raises(RCHError, match="not an rch training checkpoint"):
        load_checkpoint(path)


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    # a BatchNorm-free model, no OHEM, no padding: 2 x batch 2 == 1 x batch 4
    common = {
        "model": {"name": "tests.models.user_net:make", "options": {"layer": "body"}},
        "rch": {"enabled": False},
        "loss": {"ohem": False},
        "data": {"scales": [1.0], "flip": False},
    }
    a = train(
        tiny_config(tmp_path, name="a", **common, train={"iters": 1, "batch_size": 4}),
        progress=False,
    )
    b = train(
        tiny_config(
            tmp_path, name="b", **common, train={"iters": 1, "batch_size": 2, "accum_steps": 2}
        ),
        progress=False,
    )
    for (name, p), q in zip(
        a.network.module.named_parameters(), b.network.module.parameters(), strict=True
    ):
        assert torch.allclose(p, q, atol=1e-6), name


def test_bf16_autocast_and_adamw_run_on_cpu(tmp_path):
    cfg = tiny_config(
        tmp_path, optim={"name": "adamw", "lr": 1e-3}, train={"amp": "bf16", "iters": 2}
    )
    result = train(cfg, progress=False)
    assert result.iterations == 2
    with pytest.raises(ValueError, match="fp16' needs CUDA"):
        train(apply_overrides(cfg, ["train.amp=fp16"]), overwrite=True, progress=False)


@pytest.mark.parametrize(
    ("override", "value"),
    [
        ("rch.formulation", "official"),
        ("rch.prototypes", "learned"),
        ("rch.prototype_source", "gt"),
        ("rch.warmup_iters", "2"),
        ("optim.warmup_iters", "2"),
    ],
)
def test_variants_train(tmp_path, override, value):
    cfg = apply_overrides(tiny_config(tmp_path), [f"{override}={value}"])
    result = train(cfg, progress=False)
    logs = read_metrics(result.run_dir, "train")
    assert all(r["loss"] == r["loss"] for r in logs)
    if override == "rch.warmup_iters":
        assert [r["rch"] == 0 for r in logs] == [True, True, False, False]
    if override == "rch.prototypes":  # parameters that the optimiser trains, not EMA buffers
        torch.manual_seed(cfg.seed)  # as train() does before it builds the network
        initial = build_network(cfg, 10).module.state_dict()["head.prototypes"]
        trained = dict(result.network.module.named_parameters())["head.prototypes"]
        assert not torch.equal(trained.detach(), initial)


def test_checkpoints_load_without_the_initial_weights(tmp_path):
    from rch.train import load_network

    result = train(tiny_config(tmp_path, train={"iters": 1}), progress=False)
    path = result.run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    state["config"]["model"]["pretrained"] = str(tmp_path / "gone.pth")  # e.g. "hub" offline
    save_checkpoint(path, {k: v for k, v in state.items() if k != "format"})
    cfg, net, classes = load_network(result.run_dir)
    assert cfg.model.pretrained.endswith("gone.pth") and len(classes) == 10
    assert torch.equal(
        net.module.state_dict()["head.prototypes"], state["model"]["head.prototypes"]
    )


def test_resume_warns_about_ignored_changes(tmp_path):
    cfg = tiny_config(tmp_path, train={"iters": 2})
    train(cfg, progress=False, stop_after=1)
    with pytest.warns(UserWarning, match=r"ignoring changed setting\(s\) \['rch\.tau'\]"):
        result = train(apply_overrides(cfg, ["rch.tau=0.25"]), resume=True, progress=False)
    assert (
        load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["config"]["rch"]["tau"] == 0.5
    )


@pytest.mark.parametrize("mode", ["loss", "hide", "off"])
def test_rch_ohem_decides_what_the_rch_loss_sees(tmp_path, mode):
    """'loss': OHEM's pixels as the loss mask; 'hide': the others ignored; 'off': no OHEM."""
    from rch.train.trainer import build_network, step_losses

    cfg = tiny_config(tmp_path, rch={"ohem": mode}, loss={"ohem_thresh": 0.01})
    net = build_network(cfg, 10)
    att = net.attachment
    seen = {}
    real = att.rch_loss

    def spy(logits, labels, loss_mask=None):
        seen["labels"], seen["mask"] = labels, loss_mask
        return real(logits, labels, loss_mask)

    att.rch_loss = spy
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 32, 48, generator=g), torch.randint(0, 10, (2, 32, 48), generator=g)
    parts, _ = step_losses(cfg, net, net.module, x, y, None)
    assert torch.isfinite(parts["rch"])
    if mode == "loss":
        keep = seen["mask"]
        assert keep is not None and 0 < int(keep.sum()) < keep.numel()
        assert torch.equal(seen["labels"], y)
    elif mode == "hide":
        assert seen["mask"] is None
        hidden = seen["labels"] == 255
        assert 0 < int(hidden.sum()) < y.numel()
        assert torch.equal(seen["labels"][~hidden], y[~hidden])
    else:
        assert seen["mask"] is None and torch.equal(seen["labels"], y)


def test_unknown_rch_ohem_is_named(tmp_path):
    from rch.train.trainer import build_network

    with pytest.raises(ValueError, match=r"rch.ohem must be one of 'loss', 'hide', 'off'; got 'x'"):
        build_network(tiny_config(tmp_path, rch={"ohem": "x"}), 10)


def test_rch_adds_one_host_read_to_a_step_with_checks_and_none_without(tmp_path, monkeypatch):
    """On a GPU every host read drains the queue and idles the GPU. A training step (forward,
    OHEM, losses, backward) of the baseline reads nothing back; RCH adds one read with its
    value checks on (the loss's, the embeddings' included) and none with
    ``rch.validate=false``. Counted on the CPU with the loss's GPU code path."""
    from rch.train.trainer import step_losses

    from ..test_functional import _HostReads

    use_gpu_path(monkeypatch)
    x = torch.randn(2, 3, 32, 48)
    y = torch.randint(0, 10, (2, 32, 48))
    reads = {}
    for name, rch in (
        ("baseline", {"enabled": False}),
        ("checked", {"validate": True}),
        ("unchecked", {"validate": False}),
        ("deferred", {"validate": "deferred"}),
    ):
        cfg = tiny_config(tmp_path, rch={**rch, "embed_dim": 8})
        torch.manual_seed(0)
        net = build_network(cfg, 10)
        net.module.train()
        with _HostReads() as spy:
            parts, _ = step_losses(cfg, net, net.module, x, y, None)
            parts["loss"].backward()
        reads[name] = spy.reads
        assert torch.isfinite(parts["loss"])
    assert reads["baseline"] == []
    assert reads["checked"] == ["__bool__"]
    assert reads["unchecked"] == []
    assert reads["deferred"] == []  # read later, where the trainer reads its losses


def test_deferred_checks_stop_a_run_before_the_optimiser_step(tmp_path, monkeypatch):
    """``rch.validate=deferred`` (the default) reads RCH's value checks where the trainer
    reads the step's losses anyway, and a failure stops the run there: before the optimiser
    step, with the iteration and the input named."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from rch import RCHHead

    cfg = tiny_config(tmp_path)
    assert cfg.rch.validate == "deferred"
    forward_embedded = RCHHead.forward_embedded

    def poisoned(self, embeddings, *args, **kwargs):
        return forward_embedded(self, embeddings * float("nan"), *args, **kwargs)

    monkeypatch.setattr(RCHHead, "forward_embedded", poisoned)
    steps = []
    handle = register_optimizer_step_pre_hook(lambda *_: steps.append(1))
    try:
        with pytest.raises(ValueError, match=r"iteration 0: value checks .*embeddings hold NaN"):
            train(cfg, progress=False)
    finally:
        handle.remove()
    assert steps == []


def test_unknown_rch_validate_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"rch\.validate must be one of True, False, 'deferred'"):
        build_network(tiny_config(tmp_path, rch={"validate": "often"}), 10)
