"""Training under ``torchrun``: the process group, the collectives the loop needs, and rank 0's
file work.

The model is wrapped in DistributedDataParallel (gloo on CPU, nccl on CUDA); every rank takes
every ``world``-th sample of the same shuffled order, so the global batch equals a
single-process batch of the same size; only rank 0 writes files (:func:`_on_rank0`). BatchNorm
statistics are per rank, as usual with DDP (``extra["sync_bn"]`` converts them on CUDA).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import one_line

__all__: list[str] = []  # NB: nothing public; sepconv.train.train() is the way in


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    owned: bool = False  # this module created the process group (and so destroys it when train() ends)

    @property
    def main(self) -> bool:
        return self.rank == 0


#: A run in one process (no process group).
_ONE_PROCESS = _Dist()


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _ONE_PROCESS
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), owned)


def _close_process_group() -> None:
    """Meet every rank, then destroy the process group: a rank that destroyed its gloo connections
    while another was still using them aborted both ("terminate called without an active
    exception"). The barrier is bounded, so a rank that died cannot hang the others here."""
    with contextlib.suppress(RuntimeError):
        dist.monitored_barrier(timeout=timedelta(seconds=120))
    dist.destroy_process_group()


def _wrap_ddp(model: nn.Module, device: torch.device, d: _Dist, sync_bn: bool) -> nn.Module:
    """``model`` as the loop runs it: itself in one process, else in DistributedDataParallel
    (with SyncBatchNorm when ``sync_bn`` on CUDA). Hooks and checkpoints keep using ``model``."""
    net: nn.Module = model
    if d.world > 1:
        if sync_bn and device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


def _all_reduce_sum(values: list[float], d: _Dist) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _params_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _ranks_in_sync(model: nn.Module, d: _Dist) -> bool | None:
    """Under DDP: whether ``model``'s parameters and buffers are bit-identical on every rank
    (``None`` in one process)."""
    if d.world <= 1:
        return None
    digests = [None] * d.world
    dist.all_gather_object(digests, _params_digest(model))
    return len(set(digests)) == 1


def _on_rank0(d: _Dist, fn: Callable[[], object]) -> None:
    """Run ``fn`` (file work) on rank 0 only; an exception there is raised on every rank, so that no
    rank waits in a collective for a rank that gave up."""
    err = None
    if d.main:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- re-raised below, on every rank
            err = e
    if d.world > 1:
        box = [err]
        if err is not None:
            try:
                pickle.dumps(err)
            except Exception:  # noqa: BLE001
                box = [RuntimeError(f"rank 0: {type(err).__name__}: {one_line(err)}")]
        dist.broadcast_object_list(box, src=0)
        if not d.main and box[0] is not None:
            raise box[0]
    if err is not None:
        raise err
