"""Where a run's randomness comes from, so that a resumed run ends bit-identical on the CPU.

The data order of an epoch and the augmentation of a step are functions of (seed, epoch, step)
alone (:func:`_epoch_order`, :func:`_step_generator`); every other source (dropout, ...) draws
from the global generators, whose states a checkpoint saves (:func:`_rng_state`) and a resumed
run restores (:func:`_set_rng_state`). Seeds may be any integer: each generator is seeded
modulo :data:`SEED_MODULUS` (numpy's modulo 2**32).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import one_line

__all__ = ["SEED_MODULUS"]

#: Generators are seeded modulo this (torch's seed range); any integer is a valid ``seed``.
SEED_MODULUS = 2**64


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed((seed * 100_003 + epoch) % SEED_MODULUS)
    return torch.randperm(n, generator=g)


def _step_generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((((seed * 1_000_003 + epoch) * 1_000_003 + step) * 257 + rank) % SEED_MODULUS)


def _seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random`` from any integer (torch and numpy take it modulo
    their seed ranges; torch maps a negative seed onto the same value modulo 2**64 itself)."""
    torch.manual_seed(seed % SEED_MODULUS)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _checkpoint_safe(obj):
    """numpy/python RNG states as plain lists so that ``torch.load(weights_only=True)`` reads them."""
    if isinstance(obj, dict):
        return {k: _checkpoint_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_checkpoint_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _rng_native(st, bad: Callable[[str], None]) -> dict:
    """The RNG states of a checkpoint (as :func:`_checkpoint_safe` stored them) in the form the
    generators take, each tried on a throw-away generator first; ``bad(msg)`` raises."""
    for key in ("torch", "numpy", "python"):
        if key not in st:
            bad(f"'rng' has no {key!r} state")
    t = st["torch"]
    want = torch.get_rng_state()
    if not (isinstance(t, Tensor) and t.dtype == torch.uint8 and t.shape == want.shape):
        bad(f"'rng' torch state is not a generator state (a uint8 tensor of {want.numel()} bytes), got "
            + (f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__))
    try:
        torch.Generator().set_state(t)
        n = st["numpy"]
        numpy_state = (str(n[0]), np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4]))
        np.random.RandomState().set_state(numpy_state)
    except (TypeError, ValueError, IndexError, KeyError, OverflowError, RuntimeError) as e:
        bad(f"'rng' numpy or torch state is malformed ({one_line(e)[:120]})")
    try:
        py = st["python"]
        python_state = (int(py[0]), tuple(int(v) for v in py[1]), None if py[2] is None else float(py[2]))
        random.Random().setstate(python_state)
    except (TypeError, ValueError, IndexError, KeyError, OverflowError) as e:
        bad(f"'rng' python state is malformed ({one_line(e)[:120]})")
    out = {"torch": t, "numpy": numpy_state, "python": python_state}
    if "cuda" in st:
        if not (isinstance(st["cuda"], (list, tuple)) and all(isinstance(c, Tensor) for c in st["cuda"])):
            bad("'rng' cuda state is not a list of generator states")
        out["cuda"] = list(st["cuda"])
    return out
