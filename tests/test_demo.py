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
    section_bsconv(Context(tmp_path, Budget.for_run(quick=True)), rep)
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


def test_radius_grid_spans_the_certified_radii_of_every_model():
    import torch

    from sepconv.demo import median_radius, radius_grid

    a = torch.tensor([-float("inf"), 2e-5, 5e-5, 1e-4, 3e-4])  # one wrong prediction
    b = torch.tensor([1e-3, 4e-3, 2e-2, -float("inf"), 5e-3])
    grid = radius_grid([a, b])
    assert grid[0] == 0.0 and grid == sorted(grid) and len(grid) <= 6
    assert grid[1] <= 3e-5 and grid[-1] >= 1e-2  # from below the 10% to above the 90% quantile
    cert = [float((a > e).double().mean()) for e in grid]
    assert cert[0] == 0.8 and any(0 < c < 0.8 for c in cert)  # the curve is not flat on the grid
    assert math.isclose(median_radius(a), 5e-5, rel_tol=1e-6) and radius_grid([torch.tensor([-float("inf")])]) == [0.0]
