"""rch.train.allocator: freed memory stays in the process, so a typical repeated step faults
no page."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

STEPS = """
import json, resource, sys
import torch
from rch.train.allocator import retain_freed_memory

torch.set_num_threads(1)
retained = retain_freed_memory() if sys.argv[1] == "retain" else None
net = torch.nn.Sequential(
    torch.nn.Conv2d(8, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
    torch.nn.Conv2d(32, 8, 3, padding=1),
)

def step():
    net(torch.randn(4, 8, 96, 96)).square().mean().backward()

for _ in range(3):
    step()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"retained": retained, "faults": faults}))
"""


def _faults(mode: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True
    )
    result: dict = json.loads(run.stdout)
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_repeated_steps_reuse_freed_memory_instead_of_faulting_fresh_pages():
    default, retained = _faults("default"), _faults("retain")
    assert retained["retained"] is True
    # steps with 4.5 MiB activations (1152 pages): by default ten steps fault in thousands
    # of pages afresh (some steps none, others several activations' worth); retained, a
    # typical step faults none. (Now and then a retained step still grows the heap by a
    # block or two, when the free memory is too fragmented for it: hence its median.)
    assert sum(default["faults"]) > 5_000
    assert statistics.median(retained["faults"]) < 50
    assert sum(retained["faults"]) < sum(default["faults"])
