"""Certified robustness on digits: sepconv's networks side by side with the 1-Lipschitz peers
deel-torchlip and orthogonium (issue 15).

Every network is trained in the same run on the same data -- scikit-learn's bundled digits, the
fixed 80/20 split of :mod:`sepconv.data`, at the dataset's default size (32x32), the same epochs,
batch size, cosine learning-rate decay per step and the sepconv trainer's augmentation (random
translations of up to 4 pixels, padded with the mean colour) -- for each seed of ``SEEDS``, and
certified on the test split at the l2 radii ``EPS`` measured in **[0, 1] pixel units**:

* the anchors (their own layers and losses, from PyPI) take [0, 1] pixels; a prediction is certified
  at ``eps`` when it is correct and its logit margin exceeds ``sqrt(2) L eps`` with ``L = 1`` (their
  layers' construction). Checked independently on the exported plain-torch model (deel-torchlip's
  ``vanilla_export()``; orthogonium's layers copied into ``nn.Conv2d``/``nn.Linear``, which its README
  documents): :func:`sepconv.spectral.lipschitz_bound` of the export (global certificate) and of all
  but its final Linear (pairwise certificate of that Linear); the goal compares against the largest
  of these valid radii, image by image;
* sepconv's networks take ``(x - mean) / std`` (the dataset's normalization) and are trained by
  :func:`sepconv.train.train`; their radii are :func:`sepconv.spectral.certified_radii` with its own
  certified bounds (``method="upper"``), in pixels: a radius in normalized units is ``radius *
  min(std)`` pixels (the normalization multiplies l2 distances by at most ``1 / min(std)``).

Goal line: the best separable network of ``OURS`` (by mean certified accuracy over ``EPS``) against
the best anchor: at or above at every eps (differences paired by seed, with 95% t-intervals), at no
more than its train-step time, with fewer parameters (:func:`goal_verdict`).

``OURS`` lists sepconv's rows as (label, TrainConfig overrides): a new model or loss is one line; a
row whose model is not registered, or whose options ``TrainConfig`` does not have (yet) or refuses,
is reported as not available. Train-step time: forward, loss, backward and optimizer step on one
fixed batch, fresh models, one torch thread, interleaved repeats.

    python -m benchmarks certified                       # the section of BENCHMARKS.md (full budget)
    python -m benchmarks certified --quick --out /tmp/b.md   # check that the harness runs
    python -m benchmarks.bench_certified --epochs 5 --seeds 0 --only "tau-CE"   # a subset, printed
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import math
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sepconv.data import augment_batch, load_dataset
from sepconv.errors import SepconvError, UnsupportedLayerError
from sepconv.models import list_models
from sepconv.spectral import certified_radii, lipschitz_bound

from ._util import interleaved_samples, md_table

TITLE = "Certified robustness: sepconv's Lipschitz networks against deel-torchlip and orthogonium (digits)"

#: One torch thread for training and timing (the 2-core machines are shared; see bench_normalize).
THREADS = 1
#: l2 radii of the certificates, in [0, 1]-scaled pixel units.
EPS = (0.1, 0.25, 0.5, 1.0)
DATA = "digits"
IMAGE_SIZE = 32  # the dataset's default size (sepconv.data: digits 32)
BATCH = 32
#: No augmentation, as the anchors' tutorials train; the issue's reference numbers are reproduced only so
#: (orthogonium, seed 0, 40 epochs: clean 98.6 %, certified 98.1 / 95.5 / 90.5 / 71.6 %; with the
#: trainer's random translations of up to 4 px: 95.5 %, 94.4 / 91.4 / 83.3 / 46.2 %).
AUGMENT = False
EPOCHS, SEEDS = 40, (0, 1, 2)
QUICK_EPOCHS, QUICK_SEEDS = 1, (0,)
QUICK_TRAIN_IMAGES = 10 * BATCH  # --quick trains on the first 320 images of the train split (10 steps)
TIMING_REPEATS, QUICK_TIMING_REPEATS = 30, 3


@dataclass(frozen=True)
class PixelMargin:
    """A ``margin`` override aimed at a pixel-l2 radius: a 1-Lipschitz network fed ``(x - mean) / std``
    certifies a logit margin ``m`` at pixel radius ``m min(std) / sqrt(2)``, so ``m = sqrt(2) eps / min(std)``
    (resolved with the data's std when the row runs)."""

    eps: float

    def resolve(self, std: Sequence[float]) -> float:
        return math.sqrt(2) * self.eps / min(std)


#: sepconv's rows: (label, TrainConfig overrides). ``data``, ``image_size``, ``epochs``, ``batch_size``,
#: ``seed`` and ``out`` are set by the bench. A row whose model is not registered, or whose options
#: TrainConfig does not have or refuses, is reported as not available. The Lipschitz rows use AdamW at
#: lr 3e-3 and the margin cross-entropy aimed at a pixel radius of 0.5 (orthogonium's target; logit
#: scale 1 on normalized digits, std 0.324, is about their temperature 0.25 on [0, 1] pixels), or HKR with
#: the same margin. lip_sep_cnn's default is orthogonal, GroupSort, depth multiplier 4; the other rows
#: change one thing each (the normalizations of Runkel et al., the minimal multiplier, MaxMin, ReLU, a
#: BatchNorm whose slopes are clipped to 1, the loss).
#: lip_sep_mobilenet is not a row: its train step is ~6x lip_sep_cnn's (334 vs 66 ms in a --quick run), ~30 min
#: per seed at this budget.
_LIP = dict(optimizer="adamw", lr=3e-3, loss="margin_ce", margin=PixelMargin(0.5), logit_scale=1.0)
#: Fantastic Four's claim (Singla & Feizi 2021: the penalty "improves provable robustness"), tested for what
#: it says: a regular simple_cnn with the trainer's defaults, without and with the penalty (the demo's beta),
#: paired over the seeds (:func:`ff_effect`).
FF_BETA = 0.01
FF_ROWS = [("sepconv simple_cnn (regular convs, trainer defaults)", dict(model="simple_cnn")),
           (f"sepconv simple_cnn + Fantastic Four penalty (beta {FF_BETA:g})",
            dict(model="simple_cnn", ff_beta=FF_BETA))]
OURS: list[tuple[str, dict]] = [
    ("sepconv simple_cnn dsc, --sn dsc, CE logit scale 10 (previous best)",
     dict(model="simple_cnn", conv="dsc", sn="dsc", logit_scale=10.0, lr=0.05)),
    ("sepconv lip_simple_cnn (regular convs, certified norm)", dict(model="lip_simple_cnn", **_LIP)),
    ("sepconv lip_sep_cnn (orthogonal, GroupSort, multiplier 4)", dict(model="lip_sep_cnn", conv="dsc", **_LIP)),
    ("sepconv lip_sep_cnn orthogonal, MaxMin, multiplier 2",
     dict(model="lip_sep_cnn", conv="dsc", model_kwargs=dict(act="maxmin", depth_multiplier=None), **_LIP)),
    ("sepconv lip_sep_cnn orthogonal, ReLU", dict(model="lip_sep_cnn", conv="dsc", model_kwargs=dict(act="relu"),
                                                  **_LIP)),
    ("sepconv lip_sep_cnn product normalization (Runkel)",
     dict(model="lip_sep_cnn", conv="dsc", model_kwargs=dict(norm="product"), **_LIP)),
    ("sepconv lip_sep_cnn composite normalization",
     dict(model="lip_sep_cnn", conv="dsc", model_kwargs=dict(norm="composite"), **_LIP)),
    ("sepconv lip_sep_cnn + bounded BatchNorm",
     dict(model="lip_sep_cnn", conv="dsc", model_kwargs=dict(bn="bounded"), **_LIP)),
    ("sepconv lip_sep_cnn, HKR",
     dict(model="lip_sep_cnn", conv="dsc", **{**_LIP, "loss": "hkr", "logit_scale": 1.0})),
    *FF_ROWS,
]

# ---------------------------------------------------------------------------------------------
# pure helpers (no peer library needed; tested in tests/test_bench_certified.py)


def pixel_radius(radius: Tensor | float, std: Sequence[float]) -> Tensor | float:
    """A certified l2 radius in normalized units ``(x - mean) / std`` as a radius in [0, 1] pixel
    units: ``||d x_norm|| <= ||d x_pix|| / min(std)``, so ``radius * min(std)`` pixels stay within it."""
    return radius * min(float(s) for s in std)


def to_pixels(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalized NCHW images back to [0, 1] pixels: ``x * std + mean`` per channel."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x * s + m


def margin_radii(logits: Tensor, y: Tensor, lipschitz: float) -> Tensor:
    """Per-sample certified l2 radius ``margin / (sqrt(2) L)`` of a correct prediction, ``-inf`` for a
    wrong one (Tsuzuku et al. 2018): the formula of :func:`sepconv.spectral.certified_radii`, applied to
    logits computed elsewhere."""
    top2 = logits.detach().double().topk(2, dim=1)
    margin = top2.values[:, 0] - top2.values[:, 1]
    r = margin / (math.sqrt(2) * lipschitz) if lipschitz > 0 else torch.where(margin > 0, math.inf, 0.0)
    return torch.where(top2.indices[:, 0] == y, r, -math.inf)


def pairwise_radii(logits: Tensor, y: Tensor, weight: Tensor, features_lipschitz: float) -> Tensor:
    """Per-sample radius of the pairwise certificate of a final linear layer ``z = W h + b`` with ``h``
    ``L_h``-Lipschitz: ``min_{j != y} (z_y - z_j) / (L_h ||w_y - w_j||)`` (Leino et al., ICML 2021), ``-inf``
    for a wrong prediction; never below ``margin / (sqrt(2) L_h ||W||_2)``."""
    z, w = logits.detach().double(), weight.detach().double()
    diff = z.gather(1, y[:, None]) - z  # (N, K): z_y - z_j
    norms = (w[y][:, None, :] - w[None, :, :]).norm(dim=2)  # (N, K): ||w_y - w_j||
    with torch.no_grad():
        r = torch.where(norms > 0, diff / (features_lipschitz * norms), torch.where(diff > 0, math.inf, -math.inf))
    r = r.scatter(1, y[:, None], math.inf).amin(1)
    return torch.where(z.argmax(1) == y, r, -math.inf)


def certified_fractions(radii: Tensor, eps: Sequence[float]) -> dict[float, float]:
    """Fraction certified at each radius (``radius > eps``, as :func:`sepconv.spectral.certified_accuracy`)."""
    return {e: float((radii > e).double().mean()) for e in eps}


_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t975(df: int) -> float:
    """Two-sided 95% Student-t quantile for ``df`` degrees of freedom (1.96 beyond 30)."""
    if df < 1:
        raise ValueError("t975 needs at least one degree of freedom")
    if df in _T975:
        return _T975[df]
    return 2.086 if df <= 20 else 2.042 if df <= 30 else 1.96


@dataclass(frozen=True)
class Spread:
    """Mean over draws (seeds) with the range and, from two draws on, a 95% t-interval of the mean."""

    mean: float
    lo: float
    hi: float
    n: int
    ci: tuple[float, float] | None = None


def spread(values: Sequence[float]) -> Spread:
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("spread of no values")
    mean = statistics.fmean(vals)
    ci = None
    if len(vals) >= 2:
        half = t975(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))
        ci = (mean - half, mean + half)
    return Spread(mean, min(vals), max(vals), len(vals), ci)


def fmt_spread(s: Spread, scale: float = 100.0, spec: str = ".1f") -> str:
    """``mean [min-max]`` (scaled, each number formatted by ``spec``; a single draw: the value alone)."""
    if s.n == 1:
        return format(scale * s.mean, spec)
    return f"{format(scale * s.mean, spec)} [{format(scale * s.lo, spec)}-{format(scale * s.hi, spec)}]"


def paired_differences(ours: Sequence[float], theirs: Sequence[float]) -> Spread:
    """``ours[i] - theirs[i]`` over the draws both have (paired by seed index)."""
    n = min(len(ours), len(theirs))
    if n == 0:
        raise ValueError("no paired draws")
    return spread([a - b for a, b in zip(ours[:n], theirs[:n])])


@dataclass
class RowResult:
    """What the bench measured for one network: per seed, clean and certified accuracies."""

    label: str
    kind: str  # "anchor" or "ours"
    params: int | None = None
    separable: bool = False
    step_s: list[float] = field(default_factory=list)  # interleaved repeats
    clean: list[float] = field(default_factory=list)
    cert: dict[float, list[float]] = field(default_factory=dict)
    lipschitz: list[float] = field(default_factory=list)  # w.r.t. [0, 1] pixels
    median_radius: list[float] = field(default_factory=list)  # ours: median certified radius (pixels, 0 if wrong)
    check_lipschitz: list[float] = field(default_factory=list)  # anchors: sepconv's bound on the export
    check_cert: dict[float, list[float]] = field(default_factory=dict)
    features_lipschitz: list[float] = field(default_factory=list)  # anchors: sepconv's bound of all but the head
    pair_cert: dict[float, list[float]] = field(default_factory=dict)  # anchors: sepconv's pairwise certificate
    best_cert: dict[float, list[float]] = field(default_factory=dict)  # anchors: per image the largest valid radius
    export_diff: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)
    steps_run: list[int] = field(default_factory=list)
    epochs_run: list[int] = field(default_factory=list)
    cert_s: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    available: bool = True
    seeds: list[int] = field(default_factory=list)  # the seeds whose run succeeded, in the order of ``clean``

    @property
    def ran(self) -> bool:
        return self.available and bool(self.clean)

    @property
    def goal_cert(self) -> dict[float, list[float]]:
        """What the goal compares: an anchor's best valid certificate when it was checked for every seed,
        else ``cert``."""
        if self.best_cert and all(len(v) == len(self.clean) for v in self.best_cert.values()):
            return self.best_cert
        return self.cert

    def mean_cert(self) -> float:
        """Mean over the radii of the mean over seeds (to pick the best of a group)."""
        return statistics.fmean(statistics.fmean(v) for v in self.goal_cert.values())

    def step_median(self) -> float:
        return statistics.median(self.step_s)


def best(rows: Sequence[RowResult]) -> RowResult | None:
    """The row with the highest mean certified accuracy over the radii (ties: clean accuracy)."""
    done = [r for r in rows if r.ran and r.cert]
    return max(done, key=lambda r: (r.mean_cert(), statistics.fmean(r.clean))) if done else None


def step_ratio(ours: Sequence[float], theirs: Sequence[float]) -> Spread:
    """Ratios of interleaved step times, repeat by repeat (neighbours in time)."""
    return spread([a / b for a, b in zip(ours, theirs)])


def _seed_pairs(a: RowResult, b: RowResult) -> list[tuple[int, int]]:
    """Index pairs of the runs of ``a`` and ``b`` with the same seed (by position when seeds are not recorded)."""
    if a.seeds and b.seeds:
        return [(i, b.seeds.index(s)) for i, s in enumerate(a.seeds) if s in b.seeds]
    return [(i, i) for i in range(min(len(a.clean), len(b.clean)))]


def goal_verdict(ours: RowResult | None, anchor: RowResult | None, eps: Sequence[float] = EPS) -> tuple[str, str]:
    """``(status, text)``: is ``ours`` at or above ``anchor``'s certified accuracy at every radius, at no
    more than its train-step time, with fewer parameters? ``status``: ``"met"`` (every paired 95% interval
    of the accuracy difference is >= 0, the median step-time ratio <= 1, fewer parameters), ``"met on the
    means"`` (the mean differences are >= 0, but an interval reaches below 0 or there is one seed only:
    one draw decides nothing), ``"not met"`` or ``"undecided"`` (a network missing)."""
    if ours is None or anchor is None:
        missing = "no separable network of sepconv ran" if ours is None else "no anchor ran"
        return "undecided", f"undecided: {missing}"
    parts, below, unsure = [], [], []
    pair = _seed_pairs(ours, anchor)
    if not pair:
        return "undecided", f"undecided: no seed ran for both {ours.label} and {anchor.label}"
    for e in eps:
        d = paired_differences([ours.goal_cert[e][i] for i, _ in pair], [anchor.goal_cert[e][j] for _, j in pair])
        if d.ci is None:
            iv = "one seed"
            unsure.append(e)
        else:
            iv = f"95% interval {100 * d.ci[0]:+.1f} to {100 * d.ci[1]:+.1f}"
            if d.ci[0] < 0:
                unsure.append(e)
        if d.mean < 0:
            below.append(e)
        parts.append(f"eps {e:g}: {100 * d.mean:+.1f} pp ({iv})")
    n = len(pair)
    text = (f"**{ours.label}** against the best anchor **{anchor.label}** (certified accuracy, ours minus theirs, "
            f"paired over {n} seed{'s' if n != 1 else ''}): " + "; ".join(parts) + ". ")
    fails = []
    if below:
        fails.append("below at eps " + ", ".join(f"{e:g}" for e in below))
    if ours.step_s and anchor.step_s:
        r = step_ratio(ours.step_s, anchor.step_s)
        med = statistics.median(a / b for a, b in zip(ours.step_s, anchor.step_s))
        text += f"Train step: {1e3 * ours.step_median():.1f} vs {1e3 * anchor.step_median():.1f} ms, ratio {med:.2f} " \
                f"(repeats {r.lo:.2f}-{r.hi:.2f}). "
        if med > 1:
            fails.append("slower train step")
    else:
        fails.append("no step time")
    if ours.params is not None and anchor.params is not None:
        text += f"Parameters: {ours.params:,} vs {anchor.params:,}. "
        if ours.params >= anchor.params:
            fails.append("not fewer parameters")
    if fails:
        return "not met", text + "**Goal not met** (" + "; ".join(fails) + ")."
    if unsure:
        return "met on the means", text + ("**Goal met on the means, not established**: the paired interval reaches "
                                           "below 0 (or one seed only) at eps " + ", ".join(f"{e:g}" for e in unsure)
                                           + "; more seeds are needed to decide.")
    return "met", text + "**Goal met**: every paired 95% interval is at or above 0."


def ff_effect(rows: Sequence[RowResult]) -> str:
    """The Fantastic Four paragraph: penalty minus no penalty, paired over seeds, in certified accuracy at
    every eps, median certified radius and Lipschitz bound (pixels), each a mean with its 95% interval."""
    by = {r.label: r for r in rows}
    plain, pen = (by.get(label) for label, _ in FF_ROWS)
    if plain is None or pen is None or not (plain.ran and pen.ran):
        return ""
    pair = _seed_pairs(pen, plain)
    if not pair:
        return ""

    def diff(a: Sequence[float], b: Sequence[float], scale: float, spec: str) -> str:
        d = paired_differences([a[i] for i, _ in pair], [b[j] for _, j in pair])
        iv = f", 95% interval {scale * d.ci[0]:+{spec}} to {scale * d.ci[1]:+{spec}}" if d.ci else ", one seed"
        return f"{scale * d.mean:+{spec}}{iv}"

    parts = [f"certified accuracy at eps {e:g}: {diff(pen.cert[e], plain.cert[e], 100, '.1f')} pp" for e in EPS]
    parts.append(f"median certified radius: {diff(pen.median_radius, plain.median_radius, 1, '.2e')} px "
                 f"(without: {statistics.fmean(plain.median_radius):.2e} px)")
    parts.append(f"Lipschitz bound (pixels): {diff(pen.lipschitz, plain.lipschitz, 1, '.3g')} "
                 f"(without: {statistics.fmean(plain.lipschitz):.3g})")
    return (f"Fantastic Four's claim (the penalty improves provable robustness), penalty (beta {FF_BETA:g}) minus "
            f"none, paired over {len(pair)} seed{'s' if len(pair) != 1 else ''}: " + "; ".join(parts) + ".")


def is_separable(model: nn.Module) -> bool:
    """Every spatial convolution (kernel larger than 1x1) with more than one input channel is depthwise
    (``groups == in_channels``), and there is at least one such depthwise convolution."""
    depthwise = False
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1) and m.in_channels > 1:
            if m.groups != m.in_channels:
                return False
            depthwise = True
    return depthwise


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


#: Wall time of a training step in a run over the timed step alone (fetching and augmenting the batch).
DATA_FACTOR = 1.1


def estimate_seconds(rows: Sequence[RowResult], epochs: int, steps_per_epoch: int, n_seeds: int,
                     fixed_s: float = 0.0) -> float:
    """Wall time of a run of ``n_seeds`` x ``epochs`` epochs from what ``rows`` measured: per network and seed,
    the timed step x ``DATA_FACTOR`` per step, the rest of its measured training time (set-up, evaluation,
    checkpoints) per epoch, and its certification time; plus ``fixed_s``."""
    total = fixed_s
    for r in rows:
        if not (r.train_s and r.step_s):
            continue
        step = r.step_median()
        rest = statistics.fmean(max(0.0, t - n * step) / e for t, n, e in zip(r.train_s, r.steps_run, r.epochs_run))
        total += n_seeds * (epochs * (steps_per_epoch * step * DATA_FACTOR + rest) + statistics.fmean(r.cert_s))
    return total


class Unavailable(Exception):
    """A row of ``OURS`` that this sepconv cannot run (yet); the message says why."""


def ours_config(overrides: dict, *, epochs: int, seed: int, out: str, std: Sequence[float] = (1.0,),
                train_images: int | None = None):
    """The :class:`~sepconv.train.TrainConfig` of one of ``OURS``'s rows (a :class:`PixelMargin` resolved
    with ``std``), or :class:`Unavailable` (an unregistered model, an option TrainConfig does not have,
    a value it refuses)."""
    from sepconv.train import TrainConfig

    overrides = {k: v.resolve(std) if isinstance(v, PixelMargin) else v for k, v in overrides.items()}

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise Unavailable(f"TrainConfig has no option {', '.join(map(repr, unknown))} (yet)")
    model = overrides.get("model", TrainConfig.model)
    if model not in list_models():
        raise Unavailable(f"model {model!r} is not registered (yet)")
    cfg = TrainConfig(**{**dict(data=DATA, image_size=IMAGE_SIZE, batch_size=BATCH, augment=AUGMENT),
                         **overrides, "epochs": epochs, "seed": seed, "out": out, "train_images": train_images})
    try:
        cfg.validate()
    except SepconvError as e:
        raise Unavailable(str(e)) from None
    return cfg


# ---------------------------------------------------------------------------------------------
# certified Lipschitz bound of a plain torch model (sepconv), with exact rules for two peer layers

def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def one_lipschitz_by_rule(m: nn.Module) -> str | None:
    """Name of a parameter-free layer whose l2 Lipschitz constant is exactly 1 but for which
    :func:`sepconv.spectral.lipschitz_bound` has no rule, else ``None``: GroupSort / MaxMin (a
    permutation within disjoint groups: sorting is 1-Lipschitz) and l2-norm pooling over disjoint
    windows (``|| ||a|| - ||b|| || <= ||a - b||`` per window, windows disjoint)."""
    name = type(m).__name__
    if name in ("GroupSort", "GroupSort2", "FullSort", "MaxMin"):
        return name
    if isinstance(m, nn.LPPool2d) and float(m.norm_type) == 2.0 and (
            m.stride is None or _pair(m.stride) == _pair(m.kernel_size)):
        return "LPPool2d(p=2, disjoint windows)"
    return None


def certified_bound(model: nn.Module, input_shape: Sequence[int]) -> tuple[float, list[str]]:
    """``(L, notes)``: ``lipschitz_bound(model, method="upper")`` (eval mode). When sepconv cannot
    trace or bound the whole model and it is an ``nn.Sequential``, the product of the bounds of its
    runs of layers between those of :func:`one_lipschitz_by_rule` (taken as 1, named in ``notes``)."""
    model.eval()
    try:
        return lipschitz_bound(model, tuple(input_shape), method="upper"), []
    except UnsupportedLayerError:
        if not isinstance(model, nn.Sequential):
            raise
    L, notes, seg = 1.0, set(), []
    x = torch.zeros(1, *input_shape)
    seg_in = tuple(x.shape[1:])

    def close():
        nonlocal L, seg
        if seg:
            body = nn.Sequential(*seg) if len(seg_in) == 3 else nn.Sequential(nn.Flatten(), *seg)
            shape = seg_in if len(seg_in) == 3 else (math.prod(seg_in), 1, 1)
            L *= lipschitz_bound(body, shape, method="upper")
        seg = []

    with torch.no_grad():
        for child in model:
            rule = one_lipschitz_by_rule(child)
            if rule:
                close()
                notes.add(rule)
                x = child(x)
                seg_in = tuple(x.shape[1:])
            else:
                if not seg:
                    seg_in = tuple(x.shape[1:])
                seg.append(child)
                x = child(x)
        close()
    return L, sorted(notes)


def plain_export(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parametrized (or subclassed) Conv2d / Linear replaced by a plain
    ``nn.Conv2d`` / ``nn.Linear`` holding its current weight -- orthogonium's documented export
    ("conv.weight can be assigned to a torch.nn.Conv2d")."""
    model = copy.deepcopy(model).eval()
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child) in (nn.Conv2d, nn.Linear) or not isinstance(child, (nn.Conv2d, nn.Linear)):
                continue
            with torch.no_grad():
                w = child.weight.detach().clone()
                b = None if child.bias is None else child.bias.detach().clone()
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                child.dilation, child.groups, b is not None, child.padding_mode)
            else:
                new = nn.Linear(child.in_features, child.out_features, b is not None)
            with torch.no_grad():
                new.weight.copy_(w)
                if b is not None:
                    new.bias.copy_(b)
            setattr(mod, name, new)
    return model


# ---------------------------------------------------------------------------------------------
# the anchors: their layers, losses and recipes (imported only when used)

#: orthogonium's cross-entropy with an eps target: offset = sqrt(2) * L * eps_target, temperature 0.25
#: (their CIFAR notebook: offset (sqrt 2 / min std) * 36/255 for normalized inputs; here L = 1 on pixels).
ORTHO_EPS_TARGET = 0.5


def _deel_net() -> nn.Module:
    """deel-torchlip's multiclass tutorial network (docs, "HKR multiclass and fooling"), at 32x32."""
    from deel import torchlip

    feat = 32 * (IMAGE_SIZE // 4) ** 2
    with warnings.catch_warnings():  # their Sequential warns that Flatten is not one of their layers
        warnings.simplefilter("ignore")
        return torchlip.Sequential(
            torchlip.SpectralConv2d(1, 16, (3, 3), padding="same"), torchlip.GroupSort2(),
            torchlip.ScaledL2NormPool2d((2, 2)),
            torchlip.SpectralConv2d(16, 32, (3, 3), padding="same"), torchlip.GroupSort2(),
            torchlip.ScaledL2NormPool2d((2, 2)),
            nn.Flatten(), torchlip.SpectralLinear(feat, 64), torchlip.GroupSort2(),
            torchlip.SpectralLinear(64, 10, bias=False), k_coef_lip=1.0)


def _ortho_net() -> nn.Module:
    """The same layout with orthogonium's layers as its docs use them: AOC convs (bias-free, 'same' zero
    padding), MaxMin, l2-norm pooling (its PatchBasedCNN's pool), OrthoLinear."""
    from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d
    from orthogonium.layers.custom_activations import MaxMin
    from orthogonium.layers.linear import OrthoLinear

    feat = 32 * (IMAGE_SIZE // 4) ** 2
    return nn.Sequential(
        AdaptiveOrthoConv2d(1, 16, 3, padding="same", padding_mode="zeros", bias=False), MaxMin(), nn.LPPool2d(2, 2),
        AdaptiveOrthoConv2d(16, 32, 3, padding="same", padding_mode="zeros", bias=False), MaxMin(), nn.LPPool2d(2, 2),
        nn.Flatten(), OrthoLinear(feat, 64, bias=False), MaxMin(), OrthoLinear(64, 10, bias=False))


def _tau_ce() -> Callable[[Tensor, Tensor], Tensor]:
    from deel import torchlip

    return torchlip.TauCrossEntropyLoss(tau=3.0)


#: HKR as deel-torchlip's MNIST tutorial sets it (alpha 0.98, min_margin 1; Adam 1e-3). Their multiclass
#: Fashion-MNIST tutorial's alpha 100 (i.e. 0.99), min_margin 0.25 certifies almost nothing at eps >= 0.5
#: here (5 epochs: 85.5 / 43.5 / 0.6 / 0.0 %): a hinge margin of 0.25 is a radius of 0.18.
HKR_ALPHA, HKR_MIN_MARGIN = 0.98, 1.0


def _hkr() -> Callable[[Tensor, Tensor], Tensor]:
    from deel import torchlip

    loss = torchlip.HKRMulticlassLoss(alpha=HKR_ALPHA, min_margin=HKR_MIN_MARGIN)
    return lambda logits, y: loss(logits, F.one_hot(y, logits.shape[1]))


def _ortho_xent() -> Callable[[Tensor, Tensor], Tensor]:
    from orthogonium.losses import LossXent

    return LossXent(n_classes=10, offset=math.sqrt(2) * ORTHO_EPS_TARGET, temperature=0.25)


@dataclass(frozen=True)
class Anchor:
    label: str
    package: str  # distribution name (its version is printed)
    build: Callable[[], nn.Module]
    loss: Callable[[], Callable[[Tensor, Tensor], Tensor]]
    lr: float
    export: Callable[[nn.Module], nn.Module]
    recipe: str


ANCHORS: list[Anchor] = [
    Anchor("deel-torchlip, tau-CE (tau 3)", "deel-torchlip", _deel_net, _tau_ce, 1e-3,
           lambda m: m.vanilla_export(),
           "SpectralConv2d(1->16, 3x3) GroupSort2 ScaledL2NormPool2d(2) SpectralConv2d(16->32) GroupSort2 "
           "ScaledL2NormPool2d(2) Flatten SpectralLinear(2048->64) GroupSort2 SpectralLinear(64->10, no bias) "
           "(their multiclass tutorial's network); TauCrossEntropyLoss(tau=3); Adam"),
    Anchor("deel-torchlip, HKR", "deel-torchlip", _deel_net, _hkr, 1e-3, lambda m: m.vanilla_export(),
           f"the same network; HKRMulticlassLoss(alpha={HKR_ALPHA:g}, min_margin={HKR_MIN_MARGIN:g}) "
           "(their MNIST tutorial's values); Adam"),
    Anchor("orthogonium AOC, CE with eps target", "orthogonium", _ortho_net, _ortho_xent, 1e-3, plain_export,
           "AdaptiveOrthoConv2d(1->16, 3x3) MaxMin LPPool2d(2) AOC(16->32) MaxMin LPPool2d(2) Flatten "
           "OrthoLinear(2048->64) MaxMin OrthoLinear(64->10) (bias-free, as their notebook); "
           f"LossXent(offset=sqrt(2)*{ORTHO_EPS_TARGET:g}, temperature=0.25); Adam"),
]


def _peer_missing(anchor: Anchor) -> str | None:
    try:
        metadata.version(anchor.package)
    except metadata.PackageNotFoundError:
        return f"{anchor.package} is not installed (`pip install -e '.[bench]'`)"
    return None


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------------------------------------
# training and certification

@dataclass
class Data:
    train: object
    test: object
    x_test: Tensor  # normalized
    x_test_pix: Tensor
    y_test: Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.train.in_chans, *self.train.image_size)

    @classmethod
    def load(cls) -> Data:
        train = load_dataset(DATA, split="train", image_size=IMAGE_SIZE)
        test = load_dataset(DATA, split="test", image_size=IMAGE_SIZE)
        idx = torch.arange(len(test))
        x, y = test.get_batch(idx)
        return cls(train, test, x, test.pixels(idx).float() / 255, y)


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total))))


def train_anchor(anchor: Anchor, data: Data, epochs: int, seed: int, train_images: int | None = None) -> nn.Module:
    """Train ``anchor`` as sepconv's trainer trains its models: batches of ``BATCH`` in a seeded order
    per epoch, the trainer's augmentation, cosine decay per step; inputs in [0, 1] pixels."""
    torch.manual_seed(seed)
    model = anchor.build()
    loss_fn = anchor.loss()
    opt = torch.optim.Adam(model.parameters(), lr=anchor.lr)
    ds = data.train
    n = len(ds) if train_images is None else min(len(ds), train_images)
    steps = n // BATCH
    if steps < 1:
        raise ValueError(f"batch {BATCH} is larger than the {n} training images")
    total = epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: _cosine(k, total))
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(1_000_003 * seed + epoch)
        order = torch.randperm(n, generator=g)
        model.train()
        for step in range(steps):
            x, y = ds.get_batch(order[step * BATCH:(step + 1) * BATCH])
            if AUGMENT:
                x = augment_batch(x, g, pad=max(1, x.shape[-1] // 8), flip=ds.flip_ok)
            loss = loss_fn(model(to_pixels(x, ds.mean, ds.std)), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss {float(loss)} at epoch {epoch + 1} step {step + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def certify_anchor(anchor: Anchor, model: nn.Module, data: Data, rec: RowResult) -> None:
    """L = 1 by construction; and sepconv's certified bound on the exported model."""
    model.eval()
    with torch.no_grad():
        logits = model(data.x_test_pix)
    radii = margin_radii(logits, data.y_test, 1.0)
    rec.clean.append(float((radii > -math.inf).double().mean()))
    for e, v in certified_fractions(radii, EPS).items():
        rec.cert.setdefault(e, []).append(v)
    rec.lipschitz.append(1.0)
    try:
        exported = anchor.export(model).eval()
        with torch.no_grad():
            logits_e = exported(data.x_test_pix)
        rec.export_diff.append(float((logits_e - logits).abs().max()))
        L, notes = certified_bound(exported, data.shape)
        for n_ in notes:
            if f"taken as 1: {n_}" not in rec.notes:
                rec.notes.append(f"taken as 1: {n_}")
        rec.check_lipschitz.append(L)
        check = margin_radii(logits_e, data.y_test, L)
        for e, v in certified_fractions(check, EPS).items():
            rec.check_cert.setdefault(e, []).append(v)
        best_r = torch.maximum(radii, check)
        children = list(exported.children()) if isinstance(exported, nn.Sequential) else []
        if children and isinstance(children[-1], nn.Linear):
            L_h, _ = certified_bound(nn.Sequential(*children[:-1]), data.shape)
            rec.features_lipschitz.append(L_h)
            pair = pairwise_radii(logits_e, data.y_test, children[-1].weight, L_h)
            for e, v in certified_fractions(pair, EPS).items():
                rec.pair_cert.setdefault(e, []).append(v)
            best_r = torch.maximum(best_r, pair)
        for e, v in certified_fractions(best_r, EPS).items():
            rec.best_cert.setdefault(e, []).append(v)
    except Exception as e:  # the independent check failing is reported, not fatal
        rec.notes.append(f"sepconv check failed: {type(e).__name__}: {' '.join(str(e).split())[:160]}")


def run_ours(overrides: dict, data: Data, epochs: int, seed: int, tmp: str, rec: RowResult,
             train_images: int | None = None) -> None:
    from sepconv.train import train

    cfg = ours_config(overrides, epochs=epochs, seed=seed, out=f"{tmp}/{_slug(rec.label)}-{seed}",
                      std=data.train.std, train_images=train_images)
    t = time.perf_counter()
    model = train(cfg, progress=False, log=False).model.eval()
    rec.train_s.append(time.perf_counter() - t)
    rec.steps_run.append(epochs * (min(len(data.train), train_images or len(data.train)) // BATCH))
    rec.epochs_run.append(epochs)
    t = time.perf_counter()
    batches = [(data.x_test[i:i + 500], data.y_test[i:i + 500]) for i in range(0, len(data.y_test), 500)]
    radii, L = ours_radii(model, batches, data.train.std)
    rec.cert_s.append(time.perf_counter() - t)
    rec.clean.append(float((radii > -math.inf).double().mean()))
    for e, v in certified_fractions(radii, EPS).items():
        rec.cert.setdefault(e, []).append(v)
    rec.lipschitz.append(L / min(data.train.std))
    rec.median_radius.append(float(radii.clamp_min(0).median()))


def ours_radii(model: nn.Module, batches, std: Sequence[float]) -> tuple[Tensor, float]:
    """``(radii in pixel units, L w.r.t. the model's input)`` by :func:`sepconv.spectral.certified_radii`
    with its own bounds (``method='upper'``): ``input_scale=std`` where it takes one (its radii are then in
    pixels), else its radii times ``min(std)``."""
    if "input_scale" in inspect.signature(certified_radii).parameters:
        return certified_radii(model, batches, input_scale=tuple(std))
    radii, L = certified_radii(model, batches)
    return pixel_radius(radii, std), L


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")[:60]


# ---------------------------------------------------------------------------------------------
# train-step timing (fresh models, fixed batch, interleaved)

def _anchor_step(anchor: Anchor, x: Tensor, y: Tensor) -> tuple[Callable[[], None], nn.Module]:
    torch.manual_seed(0)
    model = anchor.build()
    loss_fn = anchor.loss()
    opt = torch.optim.Adam(model.parameters(), lr=anchor.lr)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return step, model


def _ours_loss(cfg) -> tuple[Callable[[Tensor, Tensor], Tensor], str | None]:
    """The loss the trainer optimizes for ``cfg``: ``sepconv.train.classification_loss`` with every
    setting of its signature that ``cfg`` has (``logit_scale``, ``loss``, ``margin``, ...)."""
    from sepconv.train import classification_loss

    names = list(inspect.signature(classification_loss).parameters)[2:]
    kw = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
    note = None
    if getattr(cfg, "loss", "ce") != "ce" and "loss" not in kw:
        note = (f"step timed with the scaled cross-entropy, not {cfg.loss!r} (classification_loss takes no loss "
                "name); a loss on 10 logits is a negligible share of a step")
    return (lambda logits, y: classification_loss(logits, y, **kw)), note


def _ours_step(cfg, data: Data, x: Tensor, y: Tensor) -> tuple[Callable[[], None], nn.Module, str | None]:
    """The trainer's step on a model built as the trainer builds it (prepare hooks, channels_last)."""
    from sepconv.train import build_model, default_hooks, make_optimizer

    torch.manual_seed(0)
    hooks = default_hooks(cfg, data.shape)
    model = build_model(cfg, data.train.num_classes, data.train.in_chans, hooks, image_size=data.shape[1:])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, model)
    loss_fn, note = _ours_loss(cfg)

    def step():
        model.train()
        loss = loss_fn(model(x), y)
        for term in hooks.loss_terms.values():
            loss = loss + term(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, model, note


# ---------------------------------------------------------------------------------------------

def _select(label: str, only: Sequence[str] | None) -> bool:
    return not only or any(o.lower() in label.lower() for o in only)


def measure(quick: bool, epochs: int | None = None, seeds: Sequence[int] | None = None,
            only: Sequence[str] | None = None, log: Callable[[str], None] = print) -> tuple[list[RowResult], dict]:
    """Train and certify every selected row for every seed; time their train steps. Returns the rows
    and facts about the run (epochs, seeds, std, times, estimates)."""
    epochs = epochs or (QUICK_EPOCHS if quick else EPOCHS)
    seeds = tuple(seeds if seeds is not None else (QUICK_SEEDS if quick else SEEDS))
    train_images = QUICK_TRAIN_IMAGES if quick else None
    data = Data.load()
    xb, yb = data.train.get_batch(torch.arange(BATCH))
    xb_pix = to_pixels(xb, data.train.mean, data.train.std)
    rows: list[RowResult] = []
    steps: dict[str, Callable[[], None]] = {}
    anchors = {}
    ours = {}
    for a in ANCHORS:
        if not _select(a.label, only):
            continue
        rec = RowResult(a.label, "anchor")
        rows.append(rec)
        why = _peer_missing(a)
        if why:
            rec.available, rec.notes = False, [why]
            continue
        step, model = _anchor_step(a, xb_pix, yb)
        rec.params = trainable_params(model)
        steps[a.label] = step
        anchors[a.label] = a
    for label, overrides in OURS:
        if not _select(label, only):
            continue
        rec = RowResult(label, "ours")
        rows.append(rec)
        try:
            cfg = ours_config(overrides, epochs=epochs, seed=0, out="unused", std=data.train.std)
            step, model, note = _ours_step(cfg, data, xb, yb)
        except Unavailable as e:
            rec.available, rec.notes = False, [f"not available: {e}"]
            continue
        except Exception as e:  # a registered model that cannot be built is reported, not fatal
            rec.available, rec.notes = False, [f"not available: {type(e).__name__}: {' '.join(str(e).split())[:160]}"]
            continue
        if note:
            rec.notes.append(note)
        rec.params = trainable_params(model)
        rec.separable = is_separable(model)
        steps[label] = step
        ours[label] = overrides
    by_label = {r.label: r for r in rows}
    t0 = time.perf_counter()
    for k, v in interleaved_samples(steps, repeats=QUICK_TIMING_REPEATS if quick else TIMING_REPEATS,
                                    warmup=2).items():
        by_label[k].step_s = v
    timing_s = time.perf_counter() - t0
    steps_per_epoch = len(data.train) // BATCH
    run_steps = epochs * (min(len(data.train), train_images or len(data.train)) // BATCH)
    guess = DATA_FACTOR * len(seeds) * run_steps * sum(by_label[k].step_median() for k in steps)
    log(f"[certified] {len(steps)} networks x {len(seeds)} seed(s) x {run_steps} steps: at least {guess / 60:.1f} min "
        "of training (the timed steps; evaluation and certification come on top)")
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-certified-") as tmp:
        for seed in seeds:
            for label in steps:
                rec = by_label[label]
                t = time.perf_counter()
                try:
                    if label in anchors:
                        model = train_anchor(anchors[label], data, epochs, seed, train_images)
                        rec.train_s.append(time.perf_counter() - t)
                        rec.steps_run.append(epochs * (min(len(data.train), train_images or len(data.train)) // BATCH))
                        rec.epochs_run.append(epochs)
                        t1 = time.perf_counter()
                        certify_anchor(anchors[label], model, data, rec)
                        rec.cert_s.append(time.perf_counter() - t1)
                    else:
                        run_ours(ours[label], data, epochs, seed, tmp, rec, train_images)
                except Exception as e:  # one failing run is reported in the section, not fatal
                    rec.notes.append(f"seed {seed} failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
                    continue
                rec.seeds.append(seed)
                log(f"[certified] seed {seed} {label}: clean {100 * rec.clean[-1]:.1f}%, certified "
                    + " / ".join(f"{100 * rec.cert[e][-1]:.1f}" for e in EPS)
                    + f" % (train {rec.train_s[-1]:.0f} s, certify {rec.cert_s[-1]:.0f} s)")
    run_s = time.perf_counter() - t_all
    facts = dict(epochs=epochs, seeds=seeds, std=data.train.std, mean=data.train.mean, n_train=len(data.train),
                 n_test=len(data.test), steps_per_epoch=steps_per_epoch, run_s=run_s, timing_s=timing_s,
                 full_estimate_s=estimate_seconds(rows, EPOCHS, steps_per_epoch, len(SEEDS), timing_s),
                 train_images=train_images,
                 repeats=QUICK_TIMING_REPEATS if quick else TIMING_REPEATS)
    return rows, facts


def _show(v, facts: dict) -> str:
    return f"{v!r} = {v.resolve(facts['std']):.3f}" if isinstance(v, PixelMargin) else repr(v)


def render(rows: list[RowResult], facts: dict) -> str:
    anchors = [r for r in rows if r.kind == "anchor"]
    ours = [r for r in rows if r.kind == "ours"]
    best_anchor = best(anchors)
    best_ours = best([r for r in ours if r.separable])
    ref = best_anchor.step_median() if best_anchor and best_anchor.step_s else None

    def row(r: RowResult) -> list[object]:
        if not r.ran:
            return [r.label, f"{r.params:,}" if r.params else "-", "-", "-", "-", "-", *("-" for _ in EPS)]
        q = sorted(r.step_s)
        step = f"{1e3 * r.step_median():.1f} [{1e3 * q[len(q) // 4]:.1f}-{1e3 * q[(3 * len(q)) // 4]:.1f}]"
        ratio = f"{statistics.median(a / b for a, b in zip(r.step_s, best_anchor.step_s)):.2f}" if ref else "-"
        lip = ("1 (construction)" if r.kind == "anchor" else
               fmt_spread(spread(r.lipschitz), 1.0, ".4g") if r.lipschitz else "-")
        return [r.label + (" (separable)" if r.separable else ""), f"{r.params:,}", step, ratio,
                fmt_spread(spread(r.clean)), lip, *(fmt_spread(spread(r.cert[e])) for e in EPS)]

    std = min(facts["std"])
    head = (f"Bundled digits at {IMAGE_SIZE}x{IMAGE_SIZE} ({facts['n_train']:,} train / {facts['n_test']} test images, "
            f"the fixed split of `sepconv.data`); every network {facts['epochs']} epochs, batch {BATCH} "
            f"({facts['steps_per_epoch']} steps an epoch"
            + (f"; --quick: the first {facts['train_images']} train images only" if facts["train_images"] else "")
            + "), cosine decay per step, "
            f"{'the trainer augmentation (random translations up to 4 px) for all' if AUGMENT else 'no augmentation'}; "
            f"seeds {', '.join(map(str, facts['seeds']))}; {THREADS} torch thread. Certified accuracy at eps (an l2 "
            "radius in [0, 1] pixel units): correct with certified radius > eps. Anchors take [0, 1] pixels; their "
            "radius is margin / (sqrt(2) L) with L = 1 (their construction; Tsuzuku et al. 2018). sepconv's networks "
            f"take (x - {facts['mean'][0]:.4f}) / {std:.4f}; their radii are `sepconv.spectral.certified_radii` with "
            "its own certified bounds (`lipschitz_bound(method='upper')`; the larger of its certificates), converted "
            f"to pixels (radius x {std:.4f}). Lipschitz column: w.r.t. pixels (sepconv: L / std). "
            "Cells: mean over seeds [min-max]. Train step: forward, loss, backward, optimizer step on one fixed batch, "
            f"fresh model, median [p25-p75] of {facts['repeats']} interleaved repeats; ratio: repeat-paired median "
            "against the best anchor's. Versions: "
            + ", ".join(f"{p} {_version(p)}" for p in ("deel-torchlip", "orthogonium")) + ".")
    table = md_table(["network", "params", "train step (ms)", "step / best anchor", "clean acc (%)",
                      "Lipschitz bound (pixels)", *(f"certified @ eps={e:g} (%)" for e in EPS)],
                     [row(r) for r in anchors + ours])
    check_rows = []
    for r in anchors:
        if not (r.ran and r.check_lipschitz):
            continue
        variants = [("theirs: L = 1 (construction), global", "1", r.cert),
                    ("sepconv bound of the export, global", fmt_spread(spread(r.check_lipschitz), 1.0, ".4f"),
                     r.check_cert)]
        if r.pair_cert:
            variants.append(("sepconv bound of the features, pairwise",
                             fmt_spread(spread(r.features_lipschitz), 1.0, ".4f"), r.pair_cert))
        variants.append(("best valid per image (used by the goal)", "-", r.best_cert))
        for name, bound, cert in variants:
            check_rows.append([r.label, name, bound, *(fmt_spread(spread(cert[e])) for e in EPS)])
    diffs = "; ".join(f"{r.label} {max(r.export_diff):.1e}" for r in anchors if r.export_diff)
    check = ("The anchors' certificates, checked independently with sepconv on the exported plain-torch model "
             "(deel-torchlip `vanilla_export()`; orthogonium's layers copied into nn.Conv2d / nn.Linear): "
             "`lipschitz_bound(method='upper')` of the whole export (global certificate, margin / (sqrt(2) L)) and of "
             "all but its final Linear (pairwise certificate of that Linear, Leino et al. 2021: min over classes j of "
             "(z_y - z_j) / (L_h ||w_y - w_j||)). The goal compares against the largest of these valid radii per "
             f"image. Largest |logit difference| between export and model: {diffs or '-'}.\n\n"
             + md_table(["anchor", "certificate", "bound", *(f"certified @ eps={e:g} (%)" for e in EPS)],
                        check_rows)) if check_rows else ""
    recipes = "\n".join(f"* **{a.label}** ({a.package}): {a.recipe}, lr {a.lr:g}." for a in ANCHORS
                        if any(r.label == a.label for r in rows))
    recipes += "\n" + "\n".join(
        f"* **{label}**: TrainConfig({', '.join(f'{k}={_show(v, facts)}' for k, v in o.items())})"
        for label, o in OURS if any(r.label == label for r in rows))
    notes = "\n".join(f"* {r.label}: {n}" for r in rows for n in r.notes)
    _, verdict = goal_verdict(best_ours, best_anchor)
    est = facts["full_estimate_s"]
    timing = (f"This run: {facts['run_s']:.0f} s of training and certification. The full budget ({EPOCHS} epochs, "
              f"{len(SEEDS)} seeds) is estimated at {est / 60:.0f} min from this run's step times, its other "
              "training time per epoch and its certification times.")
    return "\n\n".join(p for p in [
        head, table, "Goal: " + verdict, ff_effect(rows), check, "Recipes:\n\n" + recipes,
        ("Notes:\n\n" + notes) if notes else "",
        timing] if p)


def run(quick: bool = False, epochs: int | None = None, seeds: Sequence[int] | None = None,
        only: Sequence[str] | None = None) -> str:
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        rows, facts = measure(quick, epochs, seeds, only, log=lambda s: print(s, file=sys.stderr, flush=True))
    finally:
        torch.set_num_threads(before)
    return render(rows, facts)


_LOG_LINE = re.compile(r"\[certified\] seed (\d+) (.*?): clean ([\d.]+)%, certified ([\d.]+) / ([\d.]+) / ([\d.]+) / "
                       r"([\d.]+) %")


def goal_over_logs(paths: Sequence[str], anchor_label: str = "orthogonium AOC, CE with eps target") -> str:
    """The goal's paired comparison over every seed found in the stderr logs of several runs (the per-seed
    lines ``measure`` prints; a seed seen twice counts once): how a run with more seeds for the deciding
    rows is joined to the full run. One line per row against ``anchor_label``."""
    rows: dict[str, RowResult] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            m = _LOG_LINE.match(line)
            if not m:
                continue
            seed, label = int(m.group(1)), m.group(2)
            r = rows.setdefault(label, RowResult(label, "anchor" if label == anchor_label else "ours"))
            if seed not in r.seeds:
                r.seeds.append(seed)
                r.clean.append(float(m.group(3)) / 100)
                for e, g in zip(EPS, range(4, 8)):
                    r.cert.setdefault(e, []).append(float(m.group(g)) / 100)
    anchor = rows.pop(anchor_label)
    out = []
    for r in rows.values():
        pair = _seed_pairs(r, anchor)
        parts = []
        for e in EPS:
            d = paired_differences([r.cert[e][i] for i, _ in pair], [anchor.cert[e][j] for _, j in pair])
            wins = sum(r.cert[e][i] >= anchor.cert[e][j] for i, j in pair)
            iv = f"95% interval {100 * d.ci[0]:+.2f} to {100 * d.ci[1]:+.2f}; " if d.ci else ""
            parts.append(f"eps {e:g}: {100 * d.mean:+.2f} pp ({iv}at or above in {wins} of {len(pair)} seeds)")
        out.append(f"**{r.label}** minus **{anchor.label}**, certified accuracy paired over seeds "
                   f"{', '.join(map(str, sorted(r.seeds)))}: " + "; ".join(parts) + ".")
    return "\n\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--combine"]:
        print(goal_over_logs(sys.argv[2:]))
        raise SystemExit(0)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_certified")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--only", nargs="+", help="rows whose label contains one of these (case-insensitive)")
    a = ap.parse_args()
    print(run(quick=a.quick, epochs=a.epochs, seeds=a.seeds, only=a.only))
