"""Choosing the rank of every converted layer: given, by retained energy, or by a FLOP budget.

Ranks are always chosen from the (data-free) weight spectra of the target
(:meth:`~sepconv.decompose.targets.ConversionTarget.spectrum`): ``rank`` gives them (an int for
every layer, ``"full"`` = exact, or ``{layer: int}``); ``energy`` takes per layer the smallest rank
whose mean retained energy reaches it (Network Decoupling's rule, Guo et al., arXiv 1808.05517);
``speedup`` makes the converted layers' FLOPs about ``1 / speedup`` of the originals.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from . import factor as fz
from .targets import ConversionTarget, conv_macs

__all__ = ["choose_ranks"]


def choose_ranks(target: ConversionTarget, convs: dict[str, tuple[nn.Conv2d, tuple | None]], rank: Any,
                 energy: float | None, speedup: float | None, p: float | None) -> dict[str, int]:
    """``{name: rank}`` for the convs ``{name: (conv, input shape)}``; exactly one of ``rank``,
    ``energy``, ``speedup`` is given (``speedup`` needs the input shapes; ``p``: the subspace
    fraction of a target with a second width, which enters its cost)."""
    fulls = {nm: target.full_rank(cv) for nm, (cv, _) in convs.items()}
    if rank is not None:
        if isinstance(rank, dict):
            missing = [nm for nm in convs if nm not in rank]
            if missing:
                raise ConfigError(f"rank: no entry for layer {missing[0]!r}")
            return {nm: _check_int_rank(nm, rank[nm], fulls[nm]) for nm in convs}
        return {nm: _check_int_rank(nm, rank, fulls[nm]) for nm in convs}
    spectra = {nm: target.spectrum(cv) for nm, (cv, _) in convs.items()}
    if energy is not None:
        return {nm: min(fz.energy_rank(spectra[nm], energy), fulls[nm]) for nm in convs}
    return _speedup_ranks(target, convs, fulls, spectra, speedup, p)


def _check_int_rank(name: str, r: Any, full: int) -> int:
    if r == "full":
        return full
    if isinstance(r, bool) or not isinstance(r, int):
        raise ConfigError(f"{name}: rank must be a positive integer or 'full', got {r!r}")
    if r < 1 or r > full:
        raise ConfigError(f"{name}: rank {r} is out of range: this layer's full rank is {full} "
                          f"(rank must be in [1, {full}]; pass a {{layer: rank}} dict or layers= to treat it apart)")
    return r


def _speedup_ranks(target, convs, fulls, spectra, speedup, p) -> dict[str, int]:
    """Every layer first gets the largest rank within its own share ``flops / speedup`` (at least
    1); then ranks are raised greedily, one step at a time, by the best gain in retained energy
    per extra FLOP while the converted layers' total stays within ``sum(flops) / speedup``."""
    cost = {nm: (lambda r, cv=cv, hw=shape[-2:]: target.macs(cv, hw, r, target.mid_channels(cv, r, p)))
            for nm, (cv, shape) in convs.items()}
    orig = {nm: conv_macs(cv, shape[-2:]) for nm, (cv, shape) in convs.items()}
    budget = sum(orig.values()) / speedup
    ranks = {}
    for nm in convs:
        ok = [r for r in range(1, fulls[nm] + 1) if cost[nm](r) <= orig[nm] / speedup]
        ranks[nm] = max(ok) if ok else 1
    total = sum(cost[nm](ranks[nm]) for nm in convs)
    while True:
        best, best_gain = None, 0.0
        for nm in convs:
            r = ranks[nm]
            if r >= fulls[nm]:
                continue
            extra = cost[nm](r + 1) - cost[nm](r)
            if total + extra > budget:
                continue
            gain = (fz.retained_energy(spectra[nm], r + 1) - fz.retained_energy(spectra[nm], r)) / max(extra, 1)
            if best is None or gain > best_gain:
                best, best_gain = nm, gain
        if best is None:
            break
        total += cost[best](ranks[best] + 1) - cost[best](ranks[best])
        ranks[best] += 1
    return ranks
