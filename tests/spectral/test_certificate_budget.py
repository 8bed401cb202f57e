"""The certificate's work budget (``certificate_budget``, ``spectrum --certificate-flops``) and the
progress bars inside a layer's search (``sepconv.spectral.progress``)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from sepconv.cli import main
from sepconv.errors import ConfigError
from sepconv.spectral import (
    ConvSpec,
    analyze,
    bracket,
    bracketing,
    certificate_budget,
    certify,
    lipschitz_bound,
    progress,
    upper_bound,
)

SIZE = (16, 16)


@pytest.fixture
def layer():
    torch.manual_seed(5)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64)  # above the dense SVD's size: the certified search
    spec = ConvSpec(SIZE, 1, 1)
    bracketing.RECENT.clear()
    yield w, spec, certify.certificate_cost(w, spec)[0]
    bracketing.RECENT.clear()


def test_the_budget_decides_the_certificate_inside_the_block_only(layer):
    w, spec, flops = layer
    assert flops < bracketing.CERTIFICATE_FLOPS  # the default certifies it
    with certificate_budget(flops * 0.99):
        below = bracket(w, spec, tol=1e-6)
        with certificate_budget(flops * 1.01):  # nested: the inner one holds inside it ...
            inner = bracket(w, spec, tol=1e-6)
        after = bracket(w, spec, tol=1e-6)  # ... and the outer one again after it
        explicit = bracket(w, spec, tol=1e-6, certificate_flops=flops * 1.01)  # an argument wins
    default = bracket(w, spec, tol=1e-6)
    assert [b.how for b in (below, inner, after, explicit, default)] == [
        below.how, "cholesky", below.how, "cholesky", "cholesky"]
    assert below.how in ("majorant", "fantastic4") and below.upper > below.lower * (1 + 1e-6)
    assert default.upper <= default.lower * (1 + 1e-6) * (1 + 1e-12)
    assert below.lower <= default.upper and default.lower <= below.upper  # both brackets of one norm


def _spy_iterate(monkeypatch, scale_first=None):
    """Record the rtol of every LOBPCG run of the bracket search; ``scale_first``: scale the first run's
    Ritz values by it (a lower end left short, as a loose run may leave it)."""
    calls, real = [], bracketing.iterative.iterate

    def spy(op, X0, rtol, **kw):
        ritz = real(op, X0, rtol=rtol, **kw)
        calls.append(rtol)
        if scale_first is not None and len(calls) == 1:
            ritz = dataclasses.replace(ritz, theta=ritz.theta * scale_first)
        return ritz
    monkeypatch.setattr(bracketing.iterative, "iterate", spy)
    return calls


def test_with_no_certificate_the_lower_end_is_tightened_only_where_that_could_bring_the_bracket_within_tol(
        layer, monkeypatch):
    w, spec, _ = layer
    truth = float(torch.linalg.svdvals(spec.dense_operator(w))[0])
    calls = _spy_iterate(monkeypatch)
    with certificate_budget(0):  # no certificate: the upper end is the majorant or Fantastic Four
        wide = bracket(w, spec, tol=1e-6)
    # the upper end is far above tol: one loose run, whose lower end is still within 1e-5 of the truth
    assert wide.how in ("majorant", "fantastic4") and wide.upper > wide.lower * (1 + 1e-4)
    assert calls == [min(1e-2, 0.1 * math.sqrt(1e-6))]
    assert truth * (1 - 1e-5) <= wide.lower <= truth * (1 + 1e-12) and wide.upper >= truth
    # at a tol twice the upper end's distance from the truth, a loose lower end 1 tol short leaves the
    # bracket within 2 tol: the lower end is tightened to tol/10, and the bracket is then within tol
    bracketing.RECENT.clear()
    tol = 2 * (wide.upper / truth - 1)
    calls = _spy_iterate(monkeypatch, scale_first=(1 - tol) ** 2)
    with certificate_budget(0):
        close = bracket(w, spec, tol=tol)
    assert calls == [min(1e-2, 0.1 * math.sqrt(tol)), tol / 10]
    assert close.upper <= close.lower * (1 + tol) and close.lower <= truth * (1 + 1e-12) <= close.upper


def test_a_bracket_found_under_a_smaller_budget_is_not_served_under_a_larger_one(layer):
    w, spec, _ = layer
    with certificate_budget(0):
        loose = bracket(w, spec, tol=1e-6)
    assert loose.lower > 0 and loose.how != "cholesky"  # a search: remembered (bracketing.RECENT) ...
    assert bracket(w, spec, tol=1e-6).how == "cholesky"  # ... but not for a larger budget
    with certificate_budget(0):
        assert bracket(w, spec, tol=1e-6).upper == loose.upper


def test_upper_bound_analyze_and_lipschitz_bound_follow_the_budget(layer):
    w, spec, _ = layer
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    conv.weight.data.copy_(w.float())
    model = nn.Sequential(conv)
    with certificate_budget(0):
        loose = upper_bound(w, spec, tol=1e-6)
        rec = analyze(model, (16, *SIZE), methods=["exact", "upper"], tol=1e-6)[0]
        L_loose = lipschitz_bound(model, (16, *SIZE), tol=1e-6)
    tight = upper_bound(w, spec, tol=1e-6)
    exact = analyze(model, (16, *SIZE), methods=["exact", "upper"], tol=1e-6)[0]
    L = lipschitz_bound(model, (16, *SIZE), tol=1e-6)
    assert rec.values["upper"] > rec.values["exact"] * (1 + 1e-6) >= exact.values["upper"] * (1 - 1e-6)
    assert exact.values["upper"] <= exact.values["exact"] * (1 + 1e-6) * (1 + 1e-9)
    assert float(loose) > float(tight) * (1 + 1e-6) and L_loose > L * (1 + 1e-6)


@pytest.mark.parametrize("bad", [-1.0, math.nan, "1e12", True, None])
def test_a_bad_budget_is_refused(bad):
    with pytest.raises(ConfigError, match="certificate_budget: flops must be a number >= 0"):
        with certificate_budget(bad):
            pass


def test_progress_bars_inside_a_long_layer(layer, monkeypatch, capsys):
    """With progress on (and no delay), a layer's LOBPCG iterations and certificate rows show bars named
    after the layer; with it off, or outside analyze / lipschitz_bound, nothing is printed."""
    w, spec, _ = layer
    monkeypatch.setattr(progress, "DELAY", 0.0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False))
    model[0].weight.data.copy_(w.float())
    analyze(model, (16, *SIZE), methods=["exact"], tol=1e-6)
    assert capsys.readouterr().err == ""
    bracketing.RECENT.clear()
    analyze(model, (16, *SIZE), methods=["exact"], tol=1e-6, progress=True)
    err = capsys.readouterr().err
    assert "0: lower end (LOBPCG)" in err and "0: certificate (" in err and "block row" in err
    bracketing.RECENT.clear()
    lipschitz_bound(model, (16, *SIZE), tol=1e-6, progress=True)
    assert "0: certificate (" in capsys.readouterr().err


def test_spectrum_certificate_flops(capsys):
    argv = ["spectrum", "simple_cnn", "--input-size", "12", "12", "--method", "exact", "upper", "--json"]
    bracketing.RECENT.clear()
    torch.manual_seed(0)  # the same initial weights in both runs
    assert main(argv + ["--certificate-flops", "1"]) == 0
    loose = json.loads(capsys.readouterr().out)
    bracketing.RECENT.clear()
    torch.manual_seed(0)
    assert main(argv) == 0
    tight = json.loads(capsys.readouterr().out)
    width = {d: max(r["values"]["upper"] / r["values"]["exact"] - 1 for r in doc["layers"] if r["type"] == "Conv2d")
             for d, doc in (("loose", loose), ("tight", tight))}
    assert width["loose"] > 1e-3 and width["tight"] <= 1e-4 * (1 + 1e-9)
    by = {d: {r["certified_by"] for r in doc["layers"]} for d, doc in (("loose", loose), ("tight", tight))}
    assert by["loose"] & {"majorant", "fantastic4"} and by["tight"] <= {"cholesky", "circulant", "pointwise", "dense"}
    torch.manual_seed(0)
    assert main(argv[:-1] + ["--certificate-flops", "1"]) == 0  # the table says what certified each upper end
    table = capsys.readouterr().out.splitlines()
    assert "upper by" in table[0] and any(line.split()[-3] in ("majorant", "fantastic4") for line in table[1:-2])
    assert loose["lipschitz_bound"] > tight["lipschitz_bound"]
    with pytest.raises(SystemExit) as e:  # not a positive number: a usage error, status 2
        main(argv + ["--certificate-flops=-5"])
    assert e.value.code == 2 and "--certificate-flops" in capsys.readouterr().err
