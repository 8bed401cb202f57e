"""The fastest of a separable block's exact forms, measured in the runtime it will run in.

A linear separable block (a DSC or BSConv block with nothing but folded BatchNorms between its
convs) computes exactly a regular conv, its composed kernel
(:meth:`~sepconv.layers.DepthwiseSeparableConv2d.dense_form`). Fewer FLOPs do not always make the
separable form faster: a depthwise and a pointwise conv move more memory per FLOP and pay two calls,
so at small channel counts and at ranks above 1 they can take longer than the one dense conv they
replace (BENCHMARKS.md, "Fastest exact forms": in PyTorch eager at batch 1, every block of a converted
ResNet-20 runs faster dense). A block with depth multiplier or blueprints ``m > 1`` has a third exact
form in PyTorch eager: ``m`` summed branches (the deploy form for ONNX, :class:`~sepconv.layers.Branches`),
slower than eager's own form at batch 1 (one call per branch) and faster at large batches (no input
copies or slice sums: BENCHMARKS.md, "Fastest exact forms"). :func:`choose_forms` times the forms
of every such block, on the block's own input shape, in the runtime, batch and thread count given.
The calls are interleaved, as in :func:`~sepconv.deploy.measure`. A form replaces the one kept so far
(the runtime's deploy form first, then the branches, then the dense conv) only where the paired 95 %
interval of their latency ratio lies below 1 (:func:`~sepconv.deploy.latency_ratio`). Blocks with equal
forms and input shapes are timed once: latency depends on shapes, not on values. A block timed
alone is not the block in its graph, so the per-block choice is then checked on the whole model
against all blocks in their deploy forms and all dense; the fastest of the three, by the same paired rule, is
kept.
Whole models differ by a few percent where blocks alone differ by tens, so a whole-model comparison the
interval leaves open is timed again, longer (a sequential test: :data:`LOOKS` looks, each at level
:data:`LEVEL`, so that by Bonferroni's inequality an equal pair is called different at most 5 % of the time).
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import Branches, _SeparableBlock
from ..probe import dry_forward
from .export import _check_shape
from .fold import deployable
from .latency import RUNTIMES, Latency, latency_ratio, measure, torch_threads

__all__ = ["LEVEL", "LOOKS", "ChosenForms", "FormChoice", "choose_forms"]

LOOKS = 3  # looks at a whole-model comparison: the first rounds, then up to two more, each twice the one before
LEVEL = 1 - 0.05 / LOOKS  # each look's interval level: an equal pair is called different at most 5 % of the time


@dataclass(frozen=True)
class FormChoice:
    """One block's forms timed side by side on its own: ``separable`` (the runtime's deploy form),
    ``dense`` and, where the block has them as a distinct form, ``branches``. The latency ratio dense /
    separable is the geometric mean over the paired rounds, with its 95 % interval (``lo``, ``hi``);
    ``form`` is the form the block runs in after the whole-model check (``"separable"``, ``"branches"``
    or ``"dense"``)."""

    name: str
    separable: Latency
    dense: Latency
    ratio: float
    lo: float
    hi: float
    form: str
    branches: Latency | None = None


@dataclass
class ChosenForms:
    """:func:`choose_forms`' result: ``model`` (deployable, each block in its chosen form), the timing
    behind every block's choice, and the whole-model check: ``whole`` maps each plan timed (``"per
    block"``, ``"all separable"``, ``"all dense"``; equal plans timed once) to its latency, ``plan`` is
    the one kept ("all separable": every block in the runtime's deploy form)."""

    model: nn.Module
    runtime: str
    batch: int
    threads: int
    choices: list[FormChoice] = field(default_factory=list)
    whole: dict[str, Latency] = field(default_factory=dict)
    plan: str = "all separable"

    @property
    def dense(self) -> list[str]:
        return [c.name for c in self.choices if c.form == "dense"]

    @property
    def branches(self) -> list[str]:
        return [c.name for c in self.choices if c.form == "branches"]

    def summary(self) -> str:
        timed = ", ".join(f"{k} {v.median:.3g} ms" for k, v in self.whole.items())
        branches = f", {len(self.branches)} as summed branches" if self.branches else ""
        return (f"fastest forms in {self.runtime} (batch {self.batch}, {self.threads} thread"
                f"{'s' if self.threads > 1 else ''}): {len(self.dense)} of {len(self.choices)} separable blocks run "
                f"as their dense conv{branches} ({self.plan}" + (f"; whole model: {timed})" if timed else ")"))


def _runners(nets: dict[str, nn.Module], shape, runtime: str, batch: int, threads: int,
             tmp: Path) -> dict[str, Callable[[], object]]:
    """Each net of ``nets`` built in ``runtime`` (a deployable copy) as a call on one random batch."""
    dtype = next(next(iter(nets.values())).parameters()).dtype
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    fns = {}
    with torch_threads(threads):
        for i, (key, net) in enumerate(nets.items()):
            (tmp / str(i)).mkdir()
            fns[key] = RUNTIMES[runtime].build(copy.deepcopy(net), x, threads, tmp / str(i))
    return fns


def _timed(fns: dict[str, Callable[[], object]], threads: int, repeats: int, max_seconds: float,
           warmup: int = 2) -> dict[str, Latency]:
    """:func:`measure` of ``fns`` with ``threads`` torch threads, at least 5 rounds."""
    with torch_threads(threads):
        return measure(fns, repeats=repeats, warmup=warmup, max_seconds=max_seconds, min_repeats=5)


def _faster(fns: dict[str, Callable[[], object]], plan: str, kept: str, first: dict[str, Latency], threads: int,
            repeats: int, max_seconds: float) -> bool:
    """Is ``plan`` faster than ``kept``? The paired interval at :data:`LEVEL` over the rounds of ``first``;
    while it lies neither below nor above 1, the two are timed again, interleaved, with twice the rounds and
    time of the look before, and the rounds pooled (:data:`LOOKS` looks in all; still open: not faster)."""
    a, b = first[plan], first[kept]
    for look in range(1, LOOKS):
        if latency_ratio(a, b, level=LEVEL).held is not None:
            break
        more = _timed({plan: fns[plan], kept: fns[kept]}, threads, repeats << look, max_seconds * (1 << look), 1)
        a, b = a + more[plan], b + more[kept]
    return latency_ratio(a, b, level=LEVEL).held is True


def _assembled(net: nn.Module, forms: dict[str, nn.Module], shape, for_onnx: bool) -> nn.Module:
    """A deployable copy of ``net`` with the blocks named in ``forms`` replaced by the forms given
    (dense convs, branches), the others in the runtime's deploy forms."""
    net = copy.deepcopy(net)
    for name, form in forms.items():
        if not name:  # the model is one block
            net = copy.deepcopy(form)
        else:
            net.set_submodule(name, copy.deepcopy(form))
    return deployable(net, shape, for_onnx)


def choose_forms(model: nn.Module, input_shape: Sequence[int], runtime: str = "onnxruntime", batch: int = 1,
                 threads: int = 1, repeats: int = 20, max_seconds: float = 2.0) -> ChosenForms:
    """:func:`~sepconv.deploy.deployable` of ``model`` with every linear separable block in the fastest of
    its exact forms (its deploy form, its summed branches where eager's deploy form differs from them, its
    dense conv), measured in ``runtime`` (:data:`~sepconv.deploy.RUNTIMES`) at ``batch`` and ``threads`` on
    inputs of ``input_shape`` ``(C, H, W)``.

    First each distinct block alone: its forms on the block's input shape, ``repeats`` interleaved rounds
    (fewer past ``max_seconds``, at least 5); a form replaces the one kept so far (the deploy form, then
    the branches, then the dense conv) only when the paired 95 % interval of their latency ratio lies
    below 1 (a tie keeps the earlier form: fewer parameters, or fewer calls). A block alone
    is not a block in its graph (ONNX Runtime fuses a conv with the add and activation after it and keeps
    its blocked layout across layers), so then the whole model is checked: all blocks in their deploy
    forms, the per-block choice and all blocks dense, timed interleaved (at most ``5 * max_seconds``); a plan
    replaces the one kept so far (all separable first) only when the paired interval says it is faster,
    at level :data:`LEVEL`; a comparison left open is timed again, twice as long each time, up to
    :data:`LOOKS` looks (up to ``30 * max_seconds`` more per comparison, at least 5 rounds a look). Same outputs as
    ``model.eval()`` up to rounding."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    for what, v in (("batch", batch), ("threads", threads), ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"choose_forms: {what} must be a positive integer, got {v!r}")
    shape = _check_shape(input_shape)
    net = deployable(model)  # a copy: eval, baked, BatchNorm folded (no deploy forms yet)
    for_onnx = RUNTIMES[runtime].for_onnx  # the deploy forms of that runtime
    blocks = dry_forward(net, shape, record=(_SeparableBlock,), where="choose_forms").inputs
    timed: dict[tuple, tuple] = {}
    forms: dict[str, dict[str, nn.Module]] = {}  # block -> its forms other than the deploy form
    alone: dict[str, tuple] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sepconv-forms.")))
        for name, (block, in_shape) in sorted(blocks.items()):
            conv = block.dense_form(in_shape)
            if conv is None:
                continue
            candidates = {"separable": block.deploy_form(in_shape, for_onnx)}
            if not for_onnx and isinstance(branches := block.deploy_form(in_shape, True), Branches):
                candidates["branches"] = branches
            candidates["dense"] = conv.eval()
            key = (*map(repr, candidates.values()), tuple(in_shape))
            if key not in timed:
                sub = tmp / f"block{len(timed)}"
                sub.mkdir()
                lat = _timed(_runners(candidates, in_shape, runtime, batch, threads, sub), threads, repeats,
                             max_seconds)
                kept = "separable"
                for form in list(lat)[1:]:
                    if latency_ratio(lat[form], lat[kept]).held:
                        kept = form
                timed[key] = (lat, kept, latency_ratio(lat["dense"], lat["separable"]))
            forms[name] = {k: m for k, m in candidates.items() if k != "separable"}
            alone[name] = timed[key]
        plans = {"all separable": {}, "per block": {n: f[alone[n][1]] for n, f in forms.items() if alone[n][1] in f},
                 "all dense": {n: f["dense"] for n, f in forms.items()}}
        distinct: dict[tuple, str] = {}
        for label, chosen in plans.items():  # equal plans timed once, under their first label
            distinct.setdefault(tuple((n, id(m)) for n, m in chosen.items()), label)
        plan, whole = "all separable", {}
        if len(distinct) > 1:
            nets = {label: _assembled(net, plans[label], shape, for_onnx) for label in distinct.values()}
            fns = _runners(nets, shape, runtime, batch, threads, tmp)
            whole = _timed(fns, threads, repeats, 5 * max_seconds)
            for label in list(nets)[1:]:
                if _faster(fns, label, plan, whole, threads, repeats, 5 * max_seconds):
                    plan = label
        final = {n: next(k for k, f in forms[n].items() if f is m) for n, m in plans[plan].items()}
    out = ChosenForms(_assembled(net, plans[plan], shape, for_onnx), runtime, batch, threads, whole=whole, plan=plan)
    for name, (lat, _, c) in alone.items():
        out.choices.append(FormChoice(name, lat["separable"], lat["dense"], math.exp(c.mean), math.exp(c.lo),
                                      math.exp(c.hi), final.get(name, "separable"), lat.get("branches")))
    return out
