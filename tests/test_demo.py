"""The main job: `sepconv demo --quick` writes the four sections, the JSON and the plots, and every
number of the report comes from the JSON."""

import json
import math
import re

import pytest

from sepconv.report import Report, fmt, numbers, update_readme

SECTIONS = ("runkel", "he", "bsconv", "fantastic4")


def _allowed_numbers(doc) -> set[str]:
    """Every number the JSON holds, as the report prints it: numeric leaves through fmt(), and the
    numbers inside text leaves (titles, layer names...), but not the rendered verdict sentences."""
    out: set[str] = set()

    def walk(v, key=None):
        if key in ("verdict", "summary"):
            return
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, k)
        elif isinstance(v, list):
            for x in v:
                walk(x, key)
        elif isinstance(v, bool) or v is None:
            return
        elif isinstance(v, (int, float)):
            out.add(fmt(v))
            out.update(numbers(fmt(v)))
        elif isinstance(v, str):
            out.update(numbers(v))

    walk(doc)
    return out


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    import torch

    from sepconv.demo import run_demo

    torch.set_num_threads(1)  # robust on a loaded 2-core machine (OpenMP barriers stall when a core is busy)
    out = tmp_path_factory.mktemp("demo")
    path = run_demo(out, quick=True, progress=False)
    return out, path


@pytest.mark.slow
def test_quick_demo_writes_four_sections_json_and_plots(quick_demo):
    out, path = quick_demo
    md = path.read_text()
    doc = json.loads((out / "report.json").read_text())
    assert set(doc["sections"]) == set(SECTIONS)
    for key, title in (("runkel", "Runkel"), ("he", "He et al."), ("bsconv", "Haase"), ("fantastic4", "Singla")):
        sec = doc["sections"][key]
        assert title in sec["title"] and f"## {sec['title']}" in md
        assert sec["claim"] and sec["verdict"] in md
        assert sec["held"] is None and sec["verdict"].startswith("**Not a test (quick mode).**")  # tiny budgets
        assert sec["quick_outcome"] in (True, False, None)
        assert sec.get("plots") or key == "bsconv"
        for plot in sec.get("plots", []):
            assert (out / plot).is_file() and (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({plot})" in md
    assert "Quick mode" in md and doc["meta"]["quick"] is True


@pytest.mark.slow
def test_every_number_in_the_quick_report_comes_from_its_json(quick_demo):
    out, path = quick_demo
    md = path.read_text()
    allowed = _allowed_numbers(json.loads((out / "report.json").read_text()))
    stray = [n for n in numbers(md) if n not in allowed]
    assert not stray, stray[:20]


@pytest.mark.slow
def test_a_second_run_from_scratch_gives_the_same_numbers(quick_demo, tmp_path):
    """Seeds are fixed: section 3 (five networks trained, kernel analysis) rerun in a fresh directory
    reproduces the first run's tables exactly."""
    from sepconv.demo import Budget, Context, section_bsconv

    out, _ = quick_demo
    first = json.loads((out / "report.json").read_text())["sections"]["bsconv"]
    rep = Report("again")
    section_bsconv(Context(tmp_path, Budget.named("quick")), rep)
    second = json.loads(json.dumps(rep.to_dict()))["sections"]["bsconv"]
    assert first["kernel_pca"] == second["kernel_pca"]
    assert first["mobilenets"] == second["mobilenets"]


def test_report_refuses_literal_numbers_and_readme_block_is_rewritten_from_json(tmp_path):
    rep = Report("t")
    sec = rep.section("s", "A section", claim="c", paper="p")
    with pytest.raises(ValueError, match="literal numbers"):
        sec.fill("accuracy 0.93")
    sec.fill("accuracy {acc}", acc=0.9312)
    sec.verdict(True, "it held at {acc}", acc=0.9312)
    rep.write(tmp_path / "r")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo-results:start -->\nold\n<!-- demo-results:end -->\nrest\n")
    update_readme(readme, tmp_path / "r")
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro") and text.endswith("rest\n")
    assert re.search(r"\*\*A section\*\* -- \*\*Held\.\*\* it held at 0\.9312", text)


def test_a_quick_run_tests_no_claim():
    for quick, word, held in ((True, "**Not a test (quick mode).**", None), (False, "**Did not hold.**", False)):
        sec = Report("t", meta={"quick": quick}).section("s", "A section", claim="c", paper="p")
        sec.verdict(False, "it missed by {gap}", gap=0.5)
        assert sec.data["verdict"] == f"{word} it missed by 0.5" and sec.data["held"] is held


def test_median_radius_counts_a_wrong_prediction_as_zero():
    import torch

    from sepconv.demo import median_radius

    a = torch.tensor([-float("inf"), 2e-5, 5e-5, 1e-4, 3e-4])  # one wrong prediction
    assert math.isclose(median_radius(a), 5e-5, rel_tol=1e-6)
    assert median_radius(torch.tensor([-float("inf"), -float("inf"), 1.0])) == 0.0


@pytest.mark.slow
def test_every_quick_section_decides_through_paired_comparisons_over_its_seeds(quick_demo):
    """Each section's comparisons table: one row per compared claim, paired over the quick budget's
    two seeds (each testing its own fold), with its interval and "not a test" as the verdict."""
    from sepconv.demo import BUDGETS, PIXEL_EPS

    out, _ = quick_demo
    doc = json.loads((out / "report.json").read_text())
    seeds = BUDGETS["quick"].seeds
    for key in SECTIONS:
        rows = doc["sections"][key]["comparisons"]
        detail = doc["sections"][key]["comparisons_detail"]
        assert rows and len(rows) == len(detail)
        for r, d in zip(rows, detail):
            assert r["verdict"] == "not a test" and r["claim"].split()[0] in ("above", "below")
            lo, hi = (float(v) for v in (r["lo"], r["hi"]))
            assert lo <= float(r["mean"]) <= hi and d["n"] == r["draws"]
    he = [r["draws"] for r in doc["sections"]["he"]["comparisons"]]
    assert he == [seeds] * len(he)  # accuracy comparisons are over the seeds
    ff = " ".join(r["comparison"] for r in doc["sections"]["fantastic4"]["comparisons"])
    assert all(f"eps {e:g}," in ff for e in PIXEL_EPS) and "Lipschitz" in ff
    runkel = " ".join(r["comparison"] for r in doc["sections"]["runkel"]["comparisons"])
    assert "operator power iteration" in runkel and "dsc minus no SN" in runkel
    # every image of digits is tested once over the seeds' folds: pooled accuracy with its standard error
    methods = doc["sections"]["runkel"]["methods"]
    for m in methods:
        n = 1797
        assert math.isclose(m["se"], math.sqrt(m["test_acc"] * (1 - m["test_acc"]) / n), rel_tol=1e-9)


def test_the_evidence_table_gives_each_comparison_its_interval_and_verdict():
    from sepconv.evidence import compare

    held = compare([0.9, 0.92, 0.91], [0.8, 0.81, 0.79], "greater", what="a minus b")
    unsure = compare([0.9, 0.7, 0.95], [0.8, 0.81, 0.79], "no_worse", 0.02, what="c minus b")
    for quick, words in ((False, ["held", "inconclusive"]), (True, ["not a test", "not a test"])):
        sec = Report("t", meta={"quick": quick}).section("s", "S", claim="c", paper="p")
        sec.evidence("comparisons", [held, unsure])
        rows = sec.data["comparisons"]
        assert [r["verdict"] for r in rows] == words
        assert [r["claim"] for r in rows] == ["above 0", "above -0.02"]
        assert rows[0]["lo"] == held.lo and rows[0]["hi"] == held.hi and rows[0]["draws"] == 3
        assert sec.data["values"]["comparisons_level"] == 95  # the caption's number, from the data
        assert sec.data["comparisons_detail"][1]["delta"] == 0.02


def test_budgets_name_their_seeds_and_folds(tmp_path):
    from sepconv.demo import BUDGETS, Budget, Context
    from sepconv.errors import ConfigError

    assert set(BUDGETS) == {"quick", "default", "full"} and BUDGETS["default"].seeds == 3
    assert Budget.named("default", seeds=5).folds == 5 and Budget.named("default", seeds=1).folds == 0
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ConfigError, match="seeds"):
            Budget.named("default", seeds=bad)
    with pytest.raises(ConfigError, match="unknown budget 'huge'"):
        Budget.named("huge")
    ctx = Context(tmp_path, Budget.named("quick"))
    cfg = ctx.config("net", 1, model="simple_cnn")
    assert (cfg.seed, cfg.folds, cfg.fold) == (1, 2, 1) and cfg.out.endswith("net_s1")
    test = [ctx.dataset("test", s) for s in ctx.seeds]
    assert sum(len(t) for t in test) == 1797


@pytest.mark.parametrize("argv,word", [(["--quick", "--budget", "full"], "contradict"),
                                       (["--seeds", "0"], "--seeds"), (["--budget", "huge"], "--budget")])
def test_demo_cli_refuses_bad_budgets_in_one_line(capsys, tmp_path, argv, word):
    from sepconv.cli import main

    try:
        code = main(["demo", "--out", str(tmp_path / "d"), *argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and word in err and "Traceback" not in err, err
    assert not (tmp_path / "d" / "runs").exists()


@pytest.mark.parametrize("load,threads,cores,warns", [(0.0, 2, 2, False), (0.9, 2, 2, False), (1.0, 2, 2, True),
                                                      (1.0, 1, 2, False), (2.0, 1, 2, True), (3.0, 4, 8, False)])
def test_oversubscription_is_named_once_with_the_way_out(load, threads, cores, warns):
    from sepconv.runtime import oversubscription

    msg = oversubscription(threads, cores=cores, load=load)
    assert (msg is not None) is warns
    if warns:
        assert f"load average {load:.1f} on {cores} cores" in msg
        assert ("--threads 1" in msg) is (threads > 1)
