"""What every benchmark records about how and where it ran."""

from __future__ import annotations

import contextlib
import importlib
import json
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rch import _fused


def run_meta(argv: list[str] | None, **extra: Any) -> dict[str, Any]:
    """The exact command, the machine (and its GPU, if the run used one), the torch build and
    the date, plus ``extra``."""
    args = argv if argv is not None else sys.argv[1:]
    meta = {
        "command": "python " + " ".join([sys.argv[0], *args]),
        "machine": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        **extra,
    }
    if str(extra.get("device", "cpu")).startswith("cuda") and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


def write_results(path: Path, data: dict[str, Any]) -> None:
    """Write a benchmark's JSON (its folder made if missing) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    print(f"written: {path}")


@contextlib.contextmanager
def gpu_path(chunk_bytes: int = _fused.DEVICE_CHUNK_BYTES) -> Iterator[None]:
    """The loss's device switches as on a GPU, with blocks of ``chunk_bytes`` (default: the
    GPU's), on the CPU: every code path that the switches choose runs as it would on a GPU."""
    switches = [(importlib.import_module(m), name) for m, name in _fused.CPU_ONLY_SWITCHES]
    saved = [(module, name, getattr(module, name)) for module, name in switches]
    saved_chunk = _fused.CHUNK_BYTES
    for module, name in switches:
        setattr(module, name, ())
    _fused.CHUNK_BYTES = chunk_bytes
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        _fused.CHUNK_BYTES = saved_chunk


CONV_PRODUCTS_HELP = (
    "RCH's forward products as 1x1 convolutions, not BLAS (rch._fused.CONV_PRODUCTS_ON; an "
    "experiment: no cuBLAS workspace for a matmul-free network)"
)


def use_conv_products(device: str) -> None:
    """Run the loss's forward products as 1x1 convolutions on ``device``'s type."""
    _fused.CONV_PRODUCTS_ON = (torch.device(device).type,)
