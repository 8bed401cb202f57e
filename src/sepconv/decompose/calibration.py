"""Calibration for data-driven conversion: the images, and the patches each layer sees on them.

``method="gsvd"`` fits every layer on sampled im2col patches of its input (docs/decomposition.md
Sec. 1, data-driven and multi-layer): ``x`` in the original network, ``xh`` in the network whose
earlier layers are already converted. :class:`Calibration` samples the same positions for the
same layer, batch and input shape in both networks, so the two sets of patches pair up.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import DataError
from ..probe import eval_mode
from . import factor as fz
from .targets import conv_out_size

__all__ = ["Calibration", "calibration_images"]


def calibration_images(data, num_samples: int, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """At most ``num_samples`` images ``(N, C, H, W)`` from ``data`` -- a tensor, a sepconv dataset
    (a seeded random subset) or an iterable of ``(x, y)`` batches (the first ones) -- in the model's
    ``dtype`` and ``device``; anything else is a :class:`~sepconv.errors.DataError`."""
    if isinstance(data, Tensor):
        x = data[:num_samples]
    elif hasattr(data, "get_batch") and hasattr(data, "__len__"):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(data), generator=g)[:num_samples]
        x = data.get_batch(idx)[0]
    elif isinstance(data, Iterable):
        x = _first_images(data, num_samples)
    else:
        raise DataError(f"calibration data: expected a tensor (N, C, H, W), a dataset or an iterable of (x, y) "
                        f"batches, got {type(data).__name__}")
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[0] == 0:
        raise DataError(f"calibration data: expected images of shape (N, C, H, W) with N >= 1, got shape "
                        f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise DataError(f"calibration data: expected floating-point images, got {x.dtype}")
    return x.to(device=device, dtype=dtype)


def _first_images(batches: Iterable, num_samples: int) -> Tensor:
    """The first ``num_samples`` images of an iterable of image batches or ``(x, y)`` pairs."""
    parts, got = [], 0
    for batch in batches:
        xb = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(xb, Tensor):
            raise DataError(f"calibration data: expected batches of image tensors (or (x, y) pairs), "
                            f"got {type(xb).__name__}")
        parts.append(xb)
        got += xb.shape[0] if xb.ndim else 0
        if got >= num_samples:
            break
    if not parts:
        raise DataError("calibration data: the iterable yielded no batches")
    try:
        return torch.cat(parts)[:num_samples]
    except RuntimeError as e:
        raise DataError(f"calibration data: batches of different shapes "
                        f"({' '.join(str(e).split())[:120]})") from None


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the last layer of interest has been seen."""


@dataclass
class Calibration:
    """Calibration ``images`` and how patches are sampled from them: at most ``max_patches``
    per layer (spread evenly over the images), forward passes of ``batch_size`` images, ``seed``."""

    images: Tensor
    max_patches: int
    batch_size: int
    seed: int

    def _sample_index(self, name: str, batch: int, total: int, take: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()) + 7919 * batch)
        return torch.randperm(total, generator=g)[:take]

    @torch.no_grad()
    def capture(self, model: nn.Module, names: list[str], convs: dict, stop_after: str | None = None
                ) -> dict[str, Tensor]:
        """Sampled input patches ``(m, D)`` of the modules at ``names`` (``convs[name][0]`` is the
        conv whose geometry cuts them) in ``model``, run in eval mode on the images; the pass ends
        after ``stop_after`` when given."""
        found: dict[str, list[Tensor]] = {nm: [] for nm in names}
        per_image = max(1, math.ceil(self.max_patches / self.images.shape[0]))
        state = {"batch": 0}

        def hook_for(nm):
            conv = convs[nm][0]

            def hook(mod, inp):
                x = inp[0]
                keep = torch.float64 if x.dtype == torch.float64 else torch.float32  # storage of sampled patches
                bsz = x.shape[0]
                npos = math.prod(conv_out_size(conv, tuple(x.shape[-2:])))
                take = min(bsz * npos, per_image * bsz)
                idx = self._sample_index(nm, state["batch"], bsz * npos, take).to(x.device)
                found[nm].append(fz.sample_patches(x, conv.kernel_size, conv.stride,
                                                   conv._reversed_padding_repeated_twice, conv.dilation,
                                                   conv.padding_mode, idx).to(keep))  # (take, D)
                if nm == stop_after:
                    raise _Stop
            return hook

        mods = dict(model.named_modules())
        hooks = [mods[nm].register_forward_pre_hook(hook_for(nm)) for nm in names]
        try:
            with eval_mode(model):
                for b, start in enumerate(range(0, self.images.shape[0], self.batch_size)):
                    state["batch"] = b
                    try:
                        model(self.images[start:start + self.batch_size])
                    except _Stop:
                        pass
        finally:
            for h in hooks:
                h.remove()
        return {nm: torch.cat(v)[:self.max_patches] if v else torch.empty(0) for nm, v in found.items()}
