"""Evaluate a network on a dataset split: one confusion matrix over the whole split."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..data.datasets import SegmentationDataset
from ..data.loader import make_eval_loader
from ..models import split_outputs
from ..stats import confusion_matrix
from .inference import InferenceConfig, predict_probs
from .metrics import Scores, scores_from_confusion

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    """Confusion matrix ``(K, K)`` (rows = ground truth), scores and the class names."""

    confusion: Tensor
    scores: Scores
    classes: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        out = self.scores.to_dict(self.classes)
        out["confusion"] = self.confusion.tolist()
        return out


def evaluate(
    model: nn.Module,
    dataset: SegmentationDataset,
    cfg: InferenceConfig | None = None,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    limit: int | None = None,
    on_image: Callable[[int, Tensor, Tensor], None] | None = None,
) -> EvalResult:
    """Predict every image of ``dataset`` and score it.

    Under torch.distributed each process predicts every ``world_size``-th image and the
    confusion matrices are summed, so every process returns the whole split's scores.

    Args:
        model: the network (its output may be a tensor, a dict with ``"out"``, ...).
        dataset: the split to evaluate.
        cfg: inference mode, scales, flip.
        device: where to run.
        amp_dtype: autocast dtype (``None``: full precision).
        progress: show a progress bar.
        limit: evaluate only the first ``limit`` images.
        on_image: called as ``on_image(index, pred, label)`` for each image (figures).
    """
    from tqdm.auto import tqdm

    cfg = cfg or InferenceConfig()
    info = dataset.info
    k = info.num_classes
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    subset = dataset
    if limit is not None:
        subset = SegmentationDataset(dataset.pairs[:limit], info, dataset.split)
    loader = make_eval_loader(subset, rank, world)
    confusion = torch.zeros(k, k, dtype=torch.int64, device=device)
    device_type = torch.device(device).type

    def forward(x: Tensor) -> Tensor:
        ctx = (
            torch.autocast(device_type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            logits, _ = split_outputs(model(x))
        return logits.float()  # type: ignore[no-any-return]

    was_training = model.training
    model.eval()
    bar = tqdm(loader, desc=f"eval {info.name}/{dataset.split}", unit="img", disable=not progress)
    with torch.no_grad():
        for image, label, index in bar:
            image, label = image.to(device), label.to(device)
            pred = predict_probs(forward, image, cfg).argmax(1)
            confusion += confusion_matrix(label, pred, k, info.ignore_index)
            if on_image is not None:
                on_image(int(index[0]), pred[0].cpu(), label[0].cpu())
    model.train(was_training)
    if world > 1:
        dist.all_reduce(confusion)
    confusion = confusion.cpu()
    return EvalResult(confusion, scores_from_confusion(confusion), info.classes)
