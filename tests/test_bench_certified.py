"""benchmarks/bench_certified.py: the pure helpers (pixel units, certificates, aggregation over seeds,
the goal verdict, availability of sepconv's rows) without the peers; one short run of each peer's
recipe where the peer is installed (``pip install -e '.[bench]'``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_certified as bc  # noqa: E402

from sepconv.models import create_model  # noqa: E402
from sepconv.spectral import lipschitz_bound  # noqa: E402

# ------------------------------------------------------------------------------ units and certificates


def test_pixel_radius_scales_by_the_smallest_std():
    assert bc.pixel_radius(2.0, (0.5,)) == pytest.approx(1.0)
    assert bc.pixel_radius(1.0, (0.3, 0.2, 0.4)) == pytest.approx(0.2)
    r = bc.pixel_radius(torch.tensor([1.0, -math.inf, 3.0]), (0.25,))
    assert r.tolist() == [0.25, -math.inf, 0.75]


def test_pixel_radius_is_a_valid_conversion():
    """A pixel perturbation of norm pixel_radius(r) is a normalized perturbation of norm at most r."""
    std = (0.2, 0.5, 0.3)
    d = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0))
    d = d / d.norm() * bc.pixel_radius(1.0, std)
    assert float((d / torch.tensor(std).view(3, 1, 1)).norm()) <= 1.0 + 1e-6


def test_to_pixels_inverts_the_dataset_normalization():
    from sepconv.data import load_dataset

    ds = load_dataset("digits", split="test", image_size=16)
    idx = torch.arange(20)
    x, _ = ds.get_batch(idx)
    torch.testing.assert_close(bc.to_pixels(x, ds.mean, ds.std), ds.pixels(idx).float() / 255, atol=1e-5, rtol=0)


def test_margin_radii():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    r = bc.margin_radii(logits, y, 2.0)
    assert r[0].item() == pytest.approx(2.0 / (math.sqrt(2) * 2.0))
    assert r[1].item() == -math.inf  # wrong prediction
    assert bc.margin_radii(logits[:1], y[:1], 0.0)[0].item() == math.inf  # a constant network


def test_pairwise_radii_exact_and_never_below_the_global_certificate():
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    h = torch.tensor([[3.0, 0.5], [0.2, 1.0], [2.0, 2.0]])
    logits = h @ w.T
    y = logits.argmax(1)
    r = bc.pairwise_radii(logits, y, w, 1.5)
    for i in range(3):
        c = int(y[i])
        want = min(float(logits[i, c] - logits[i, j]) / (1.5 * float((w[c] - w[j]).norm())) for j in range(3) if j != c)
        assert r[i].item() == pytest.approx(want)
    g = bc.margin_radii(logits, y, 1.5 * float(torch.linalg.matrix_norm(w, 2)))
    assert bool((r >= g - 1e-12).all())
    assert bc.pairwise_radii(logits, (y + 1) % 3, w, 1.5).eq(-math.inf).all()


def test_certified_fractions_are_strict():
    r = torch.tensor([0.1, 0.5, -math.inf, 1.0])
    assert bc.certified_fractions(r, (0.1, 0.5, 1.0)) == {0.1: 0.5, 0.5: 0.25, 1.0: 0.0}


# ------------------------------------------------------------------------------ aggregation over seeds


def test_spread_and_its_interval():
    s = bc.spread([0.9, 0.95, 1.0])
    assert (s.mean, s.lo, s.hi, s.n) == (pytest.approx(0.95), 0.9, 1.0, 3)
    half = 4.303 * 0.05 / math.sqrt(3)
    assert s.ci == (pytest.approx(0.95 - half), pytest.approx(0.95 + half))
    one = bc.spread([0.5])
    assert one.ci is None and one.lo == one.hi == 0.5
    assert bc.fmt_spread(s) == "95.0 [90.0-100.0]"
    assert bc.fmt_spread(one) == "50.0"
    assert bc.fmt_spread(bc.spread([569.7]), 1.0, ".4g") == "569.7"
    with pytest.raises(ValueError):
        bc.spread([])


def test_t975_and_paired_differences():
    assert bc.t975(2) == pytest.approx(4.303)
    assert bc.t975(1000) == pytest.approx(1.96)
    d = bc.paired_differences([0.9, 0.8, 0.7], [0.85, 0.8])  # paired over the draws both have
    assert d.n == 2 and d.mean == pytest.approx(0.025)


def _row(label, kind, cert, params=100, step=0.01, separable=True, n=3):
    r = bc.RowResult(label, kind, params=params, separable=separable, step_s=[step * (1 + 0.01 * i) for i in range(9)])
    r.clean = [0.99] * n
    r.cert = {e: [v] * n for e, v in zip(bc.EPS, cert)}
    return r


def test_goal_verdict():
    anchor = _row("anchor", "anchor", (0.9, 0.8, 0.7, 0.5), params=1000, step=0.02)
    status, text = bc.goal_verdict(_row("ours", "ours", (0.92, 0.85, 0.7, 0.55)), anchor)
    assert status == "met" and "**Goal met**" in text
    below = _row("ours", "ours", (0.95, 0.9, 0.8, 0.45))
    assert bc.goal_verdict(below, anchor)[0] == "not met"
    assert "below at eps 1" in bc.goal_verdict(below, anchor)[1]
    slow = _row("ours", "ours", (0.95, 0.9, 0.8, 0.6), step=0.05)
    assert "slower train step" in bc.goal_verdict(slow, anchor)[1]
    big = _row("ours", "ours", (0.95, 0.9, 0.8, 0.6), params=1000)
    assert "not fewer parameters" in bc.goal_verdict(big, anchor)[1]
    noisy = _row("ours", "ours", (0.95, 0.9, 0.8, 0.6))
    noisy.cert[1.0] = [0.7, 0.45, 0.45]  # mean above the anchor, interval reaching below
    assert bc.goal_verdict(noisy, anchor)[0] == "met on the means"
    one = _row("ours", "ours", (0.95, 0.9, 0.8, 0.6), n=1)
    assert bc.goal_verdict(one, anchor)[0] == "met on the means"  # one draw decides nothing
    assert bc.goal_verdict(None, anchor)[0] == "undecided"
    assert bc.goal_verdict(noisy, None)[0] == "undecided"


def test_goal_pairs_runs_by_seed():
    anchor = _row("anchor", "anchor", (0.9, 0.8, 0.7, 0.5), params=1000, step=0.02, n=2)
    anchor.seeds = [1, 2]  # seed 0 failed
    ours = _row("ours", "ours", (0.92, 0.85, 0.75, 0.55))
    ours.seeds = [0, 1, 2]
    ours.cert[1.0] = [0.0, 0.55, 0.55]  # seed 0 has no partner: it must not count
    status, text = bc.goal_verdict(ours, anchor)
    assert status == "met" and "paired over 2 seeds" in text
    ours.seeds = [0, 3, 4]
    assert bc.goal_verdict(ours, anchor)[0] == "undecided"


def test_goal_uses_the_anchors_best_valid_certificate():
    anchor = _row("anchor", "anchor", (0.9, 0.8, 0.7, 0.5), params=1000, step=0.02)
    anchor.best_cert = {e: [v] * 3 for e, v in zip(bc.EPS, (0.95, 0.9, 0.8, 0.7))}
    ours = _row("ours", "ours", (0.92, 0.85, 0.75, 0.55))
    assert bc.goal_verdict(ours, anchor)[0] == "not met"
    other = _row("other", "anchor", (0.91, 0.85, 0.75, 0.6))
    assert bc.best([anchor, other]) is anchor
    assert bc.best([bc.RowResult("x", "anchor", available=False)]) is None


def test_estimate_seconds():
    r = _row("a", "anchor", (0.9, 0.8, 0.7, 0.5), step=0.02)
    r.step_s = [0.02] * 5
    r.train_s, r.steps_run, r.epochs_run, r.cert_s = [1.0], [10], [1], [3.0]
    # per seed: 4 epochs x (44 steps x 0.02 s x DATA_FACTOR + (1.0 - 10 x 0.02) s) + 3 s
    want = 2 * (4 * (44 * 0.02 * bc.DATA_FACTOR + 0.8) + 3.0) + 5.0
    assert bc.estimate_seconds([r, bc.RowResult("b", "ours")], 4, 44, 2, 5.0) == pytest.approx(want)


def test_render_runs_on_synthetic_rows():
    anchor = _row("anchor", "anchor", (0.9, 0.8, 0.7, 0.5), params=1000, step=0.02, separable=False)
    anchor.check_lipschitz, anchor.features_lipschitz, anchor.export_diff = [0.9] * 3, [0.9] * 3, [0.0]
    anchor.check_cert = anchor.pair_cert = anchor.best_cert = dict(anchor.cert)
    missing = bc.RowResult("sepconv lip_x", "ours", available=False, notes=["not available: model 'x'"])
    facts = dict(epochs=2, seeds=(0, 1, 2), std=(0.3,), mean=(0.3,), n_train=1438, n_test=359, steps_per_epoch=44,
                 run_s=1.0, timing_s=0.1, full_estimate_s=60.0, repeats=3, train_images=None)
    text = bc.render([anchor, _row("ours", "ours", (0.95, 0.9, 0.8, 0.6)), missing], facts)
    assert "Goal: **ours** against the best anchor **anchor**" in text
    assert "not available: model 'x'" in text and "| sepconv lip_x | - |" in text


def test_ff_effect_is_the_paired_difference_penalty_minus_none():
    (plain_label, _), (pen_label, pen_cfg) = bc.FF_ROWS
    assert pen_cfg["ff_beta"] == bc.FF_BETA > 0 and all(label in dict(bc.OURS) for label, _ in bc.FF_ROWS)
    plain, pen = _row(plain_label, "ours", (0.1, 0.0, 0.0, 0.0)), _row(pen_label, "ours", (0.3, 0.1, 0.0, 0.0))
    pen.cert[0.1] = [0.2, 0.3, 0.4]  # differences 0.1, 0.2, 0.3: mean 0.2, t-interval +-0.248
    plain.median_radius, pen.median_radius = [0.01, 0.02, 0.03], [0.02, 0.03, 0.04]
    plain.lipschitz, pen.lipschitz = [200.0] * 3, [150.0] * 3
    plain.seeds = pen.seeds = [0, 1, 2]
    text = bc.ff_effect([plain, pen])
    assert "paired over 3 seeds" in text and "at eps 0.1: +20.0, 95% interval -4.8 to +44.8 pp" in text, text
    assert "at eps 0.25: +10.0, 95% interval +10.0 to +10.0 pp" in text and "median certified radius: +1.00e-02" in text
    assert "Lipschitz bound (pixels): -50" in text
    assert bc.ff_effect([plain]) == ""  # nothing to compare


# ------------------------------------------------------------------------------ sepconv's rows


def test_ours_rows_that_cannot_run_are_unavailable():
    with pytest.raises(bc.Unavailable, match="no option 'no_such_option'"):
        bc.ours_config({"no_such_option": 1}, epochs=1, seed=0, out="unused")
    with pytest.raises(bc.Unavailable, match="not registered"):
        bc.ours_config({"model": "no_such_model"}, epochs=1, seed=0, out="unused")
    with pytest.raises(bc.Unavailable, match="lr"):
        bc.ours_config({"lr": -1.0}, epochs=1, seed=0, out="unused")
    cfg = bc.ours_config({"model": "simple_cnn", "lr": bc.PixelMargin(0.5)}, epochs=3, seed=2, out="o", std=(0.25,),
                         train_images=64)
    assert (cfg.epochs, cfg.seed, cfg.data, cfg.batch_size, cfg.train_images) == (3, 2, "digits", bc.BATCH, 64)
    assert cfg.lr == pytest.approx(math.sqrt(2) * 0.5 / 0.25)  # a PixelMargin is resolved with the std


def test_ours_rows_are_labelled_once_and_well_formed():
    labels = [label for label, _ in bc.OURS]
    assert len(set(labels)) == len(labels)
    assert all(isinstance(o, dict) and "model" in o for _, o in bc.OURS)


def test_is_separable():
    assert bc.is_separable(create_model("simple_cnn", num_classes=10, in_chans=1, conv="dsc"))
    assert not bc.is_separable(create_model("simple_cnn", num_classes=10, in_chans=1))
    assert not bc.is_separable(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


class MaxMin(nn.Module):
    """A pairwise sort (as orthogonium's), which sepconv's lipschitz_bound has no rule for."""

    def forward(self, z):
        a, b = z.split(z.shape[1] // 2, 1)
        return torch.cat([torch.max(a, b), torch.min(a, b)], 1)


def test_certified_bound_falls_back_to_runs_between_one_lipschitz_layers():
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 4 * 4, 10)
    model = nn.Sequential(conv, MaxMin(), nn.LPPool2d(2, 2), nn.Flatten(), lin)
    L, notes = bc.certified_bound(model, (1, 8, 8))
    want = (lipschitz_bound(nn.Sequential(conv), (1, 8, 8))
            * lipschitz_bound(nn.Sequential(nn.Flatten(), lin), (4, 4, 4)))
    assert L == pytest.approx(want, rel=1e-6)
    assert "MaxMin" in notes
    L2, notes2 = bc.certified_bound(nn.Sequential(conv, nn.ReLU()), (1, 8, 8))
    assert notes2 == [] and L2 == pytest.approx(lipschitz_bound(nn.Sequential(conv), (1, 8, 8)))
    assert bc.one_lipschitz_by_rule(nn.LPPool2d(2, 2, stride=1)) is None  # overlapping windows: no rule


def test_plain_export_copies_parametrized_layers():
    class Scale(nn.Module):
        def forward(self, w):
            return 0.5 * w

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten(), nn.Linear(32, 3))
    parametrize.register_parametrization(model[0], "weight", Scale())
    parametrize.register_parametrization(model[2], "weight", Scale())
    out = bc.plain_export(model)
    assert type(out[0]) is nn.Conv2d and type(out[2]) is nn.Linear
    x = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(out(x), model(x))
    assert parametrize.is_parametrized(model[0])  # the original is untouched


# ------------------------------------------------------------------------------ the peers' recipes


def _short_run(anchor_label: str):
    data = bc.Data.load()
    anchor = next(a for a in bc.ANCHORS if a.label == anchor_label)
    model = bc.train_anchor(anchor, data, epochs=1, seed=0, train_images=2 * bc.BATCH)
    rec = bc.RowResult(anchor.label, "anchor")
    bc.certify_anchor(anchor, model, data, rec)
    assert not [n for n in rec.notes if "failed" in n], rec.notes
    assert 0.0 <= rec.clean[0] <= 1.0
    for cert in (rec.cert, rec.check_cert, rec.pair_cert, rec.best_cert):
        vals = [cert[e][0] for e in bc.EPS]
        assert vals == sorted(vals, reverse=True) and vals[0] <= rec.clean[0]
    assert all(rec.best_cert[e][0] >= max(rec.cert[e][0], rec.check_cert[e][0]) for e in bc.EPS)
    assert rec.export_diff[0] < 1e-4
    # their layers are 1-Lipschitz by construction: sepconv's certified bound of the export agrees
    assert 0.0 < rec.check_lipschitz[0] <= 1.0 + 1e-4
    return rec


def test_deel_torchlip_recipe_runs_and_its_bound_checks():
    pytest.importorskip("deel.torchlip")
    rec = _short_run("deel-torchlip, tau-CE (tau 3)")
    assert "taken as 1: GroupSort2" in rec.notes


def test_orthogonium_recipe_runs_and_its_bound_checks():
    pytest.importorskip("orthogonium")
    _short_run("orthogonium AOC, CE with eps target")


def test_goal_over_logs_joins_the_seeds_of_several_runs(tmp_path):
    line = "[certified] seed {s} {label}: clean 98.0%, certified {a} / 95.0 / 90.0 / 70.0 % (train 1 s, certify 0 s)\n"
    anchor = "orthogonium AOC, CE with eps target"
    (tmp_path / "a.err").write_text("".join(line.format(s=s, label=lab, a=a) for s, lab, a in [
        (0, anchor, "97.0"), (0, "ours", "97.5"), (1, anchor, "97.0"), (1, "ours", "98.0")]) + "noise\n")
    (tmp_path / "b.err").write_text("".join(line.format(s=s, label=lab, a=a) for s, lab, a in [
        (1, anchor, "50.0"), (2, anchor, "97.0"), (2, "ours", "98.5")]))  # seed 1 again: the first one counts
    text = bc.goal_over_logs([tmp_path / "a.err", tmp_path / "b.err"], anchor)
    assert "paired over seeds 0, 1, 2" in text and "eps 0.1: +1.00 pp (95% interval" in text, text
    assert "at or above in 3 of 3 seeds" in text and "eps 0.25: +0.00 pp" in text
