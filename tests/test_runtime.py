"""sepconv.runtime.tune_allocator: freed buffers stay mapped (measured by page faults), opt-out works."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys, torch
from sepconv.runtime import tune_allocator
ok = tune_allocator() if sys.argv[1] == "tune" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # a 48 MiB and a 16 MiB buffer, as a training step allocates, touches and frees them
    x = torch.empty(12 * 2**20); x.fill_(1.0); y = torch.empty(4 * 2**20); y.fill_(2.0)
for _ in range(10):  # steady state (glibc raises its mmap threshold after the first frees)
    step()
before = faults()
for _ in range(5):
    step()
print(json.dumps({"ok": ok, "faults": faults() - before}))
"""


def _probe(mode: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_reuses_freed_buffers_without_page_faults():
    default, tuned = _probe("default"), _probe("tune")
    assert tuned["ok"] is True
    pages = 5 * 48 * 2**20 // 4096
    assert default["faults"] > pages // 2  # glibc maps the 48 MiB block afresh every time
    assert tuned["faults"] < pages // 20  # the heap keeps it


def test_tune_allocator_opt_out():
    assert _probe("tune", {"SEPCONV_TUNE_MALLOC": "0"})["ok"] is False
