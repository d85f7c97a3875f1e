"""Scores equal a hand-computed confusion matrix; the inference modes agree where they must."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rch.data import build_dataset
from rch.eval import InferenceConfig, evaluate, format_comparison, format_scores, slide_logits
from rch.eval.inference import predict_probs
from rch.eval.metrics import scores_from_confusion

from ..data import trees


def test_scores_match_hand_computation():
    # rows = truth: class 0: 5 right, 1 as class 1; class 1: 2 right, 2 as class 0; class 2 absent
    conf = torch.tensor([[5, 1, 0], [2, 2, 0], [0, 0, 0]])
    s = scores_from_confusion(conf)
    assert s.iou[0] == pytest.approx(5 / (6 + 7 - 5)) and s.iou[1] == pytest.approx(2 / (4 + 3 - 2))
    assert math.isnan(s.iou[2]) and math.isnan(s.acc[2])
    assert s.miou == pytest.approx((5 / 8 + 2 / 5) / 2)
    assert s.macc == pytest.approx((5 / 6 + 2 / 4) / 2)
    assert s.aacc == pytest.approx(7 / 10)
    # precision: TP over the pixels predicted as the class (columns); class 2 is never predicted
    assert s.precision[:2] == pytest.approx([5 / 7, 2 / 3]) and math.isnan(s.precision[2])
    assert s.mprecision == pytest.approx((5 / 7 + 2 / 3) / 2)
    assert s.to_dict(["a", "b", "c"])["Precision"]["b"] == pytest.approx(2 / 3)
    table = format_scores(s, ["a", "b", "c"]).splitlines()
    assert table[0].split() == ["class", "IoU", "Acc", "Prec"]
    assert table[1].split() == ["a", "62.50", "83.33", "71.43"]
    assert table[3].split() == ["c", "n/a", "n/a", "n/a"]
    # a class predicted but never in the truth counts as IoU 0
    assert scores_from_confusion(torch.tensor([[1, 1], [0, 0]])).iou == [0.5, 0.0]
    with pytest.raises(ValueError, match=r"\(K, K\)"):
        scores_from_confusion(torch.zeros(2, 3))


class ConstantNet(nn.Module):
    """Predicts ``cls`` everywhere."""

    def __init__(self, k: int, cls: int) -> None:
        super().__init__()
        self.k, self.cls = k, cls
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.k, *x.shape[-2:])
        out[:, self.cls] = 1.0
        return {"out": out + self.dummy}


def test_evaluate_equals_the_hand_counted_matrix(tmp_path):
    trees.folder(tmp_path, [0, 2, 255, 1, 1, 2], ["a", "b", "c"])  # rest of the 4x6 mask is 0
    ds = build_dataset("folder", tmp_path, "val")
    result = evaluate(ConstantNet(3, 1), ds, progress=False)
    # truth counts: class 0: 24 - 6 + 1 = 19, class 1: 2, class 2: 2, one ignored; all predicted 1
    expected = torch.tensor([[0, 19, 0], [0, 2, 0], [0, 2, 0]])
    assert torch.equal(result.confusion, expected)
    assert result.scores.iou == [0.0, pytest.approx(2 / 23), 0.0]
    text = format_scores(result.scores, result.classes)
    assert "b" in text and "8.70" in text
    table = format_comparison([("x", result.scores), ("y", result.scores)], result.classes)
    assert "+0.00" in table and "mIoU" in table


@pytest.mark.parametrize("size", [(13, 17), (5, 6)])
def test_slide_equals_whole_for_a_pointwise_model(size):
    torch.manual_seed(0)
    net = nn.Conv2d(3, 4, 1)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        whole = net(x)
        slid = slide_logits(net, x, crop=(8, 8), stride=(5, 5))
    assert slid.shape == whole.shape
    assert torch.allclose(slid, whole, atol=1e-6)


def test_flip_and_slide_and_scales_are_combined():
    torch.manual_seed(0)
    net = nn.Conv2d(3, 4, 1)
    x = torch.randn(1, 3, 12, 16)
    with torch.no_grad():
        ref = net(x).softmax(1)
        flipped = predict_probs(net, x, InferenceConfig("slide", (8, 8), (4, 4), flip=True))
        multi = predict_probs(net, x, InferenceConfig(scales=(0.5, 1.0, 2.0), flip=True))
    assert torch.allclose(flipped, ref, atol=1e-6)
    assert multi.shape == ref.shape and torch.allclose(multi.sum(1), torch.ones(1, 12, 16))
    assert (multi.argmax(1) == ref.argmax(1)).float().mean() > 0.8
    with pytest.raises(ValueError, match="mode"):
        InferenceConfig("tiles")  # type: ignore[arg-type]
