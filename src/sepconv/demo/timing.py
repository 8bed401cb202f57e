"""What a network costs to train: the median time of a training step and the memory it keeps (the
Runkel section's cost columns; the He section measures deployment latency with sepconv.deploy).

Timings are medians of repeats after one warm-up call; they vary with the machine's load
and are the only numbers of the demo that two runs do not reproduce exactly.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["train_step_costs"]


def train_step_costs(models: dict[str, nn.Module], batch: tuple[Tensor, Tensor], repeats: int) -> dict[str, dict]:
    """Per model: the median seconds of one SGD step on ``batch`` (repeats interleaved across the
    models, so that the machine's drift affects all alike), the bytes autograd saves for the
    backward pass (the activation memory of a step), and the bytes of persistent buffers; ``times``
    holds every repeat's seconds (repeat ``i`` of two models are a pair).
    Measured on copies; the models are not changed."""
    steps, cost = {}, {}
    for name, model in models.items():
        m = copy.deepcopy(model).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-4)
        x, y = batch

        def step(m=m, opt=opt, x=x, y=y):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()
        saved = 0

        def pack(t: Tensor):
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
        steps[name] = step
        cost[name] = {"saved_bytes": saved,
                      "buffer_bytes": sum(b.numel() * b.element_size() for b in m.buffers())}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, step in steps.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    for k in steps:
        cost[k]["step_s"] = statistics.median(times[k])
        cost[k]["times"] = times[k]
    return cost
