"""Markdown reports whose every number comes from their JSON twin.

A :class:`Report` holds sections; a section's numbers enter only through :meth:`Section.fill`
(a sentence template with named values), :meth:`Section.table` (rows of values) and
:meth:`Section.verdict`; each stores the values in the section's JSON data and renders them
with :func:`fmt`. Plots are matplotlib figures saved as PNG next to the report. The paper's
claim is stored as text (it is the paper's, not a measurement) and rendered as a quote.

``report.write(out)`` writes ``report.md``, ``report.json`` and ``plots/*.png`` atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .evidence import Comparison, verdict_word
from .files import atomic_path, atomic_write_text

__all__ = ["NUMBER", "README_END", "README_START", "Report", "Section", "check_readme", "fmt", "json_safe", "numbers",
           "results_summary", "update_readme"]

#: A number as a reader sees one: not part of a name such as "MobileNetV2", "ResNet-20" or "8x8".
NUMBER = re.compile(r"(?<![\w.\-])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.]*\w)")


def numbers(text: str) -> list[str]:
    """The numbers in ``text`` (see :data:`NUMBER`)."""
    return NUMBER.findall(text)


def fmt(v: Any) -> str:
    """How a value is printed in a report: ints with no decoration, floats to 4 significant
    digits, booleans as yes/no, None as a dash."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}"
    return str(v)


def json_safe(v: Any) -> Any:
    """Plain JSON types (tensors and numpy scalars become numbers, tuples lists)."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


@dataclass
class Section:
    key: str
    title: str
    claim: str
    paper: str
    data: dict = field(default_factory=dict)
    blocks: list[str] = field(default_factory=list)
    plots: dict[str, Callable[[Path], None]] = field(default_factory=dict)
    quick: bool = False  # a quick-mode run: its verdicts are "not a test"

    def fill(self, template: str, **values: Any) -> None:
        """A paragraph from ``template`` (``str.format`` fields) with ``values`` recorded in the
        JSON under ``data['values']`` (a name holds one value per section: a second, different value
        under the same name is refused). Literal numbers in the template are refused (a
        :class:`~sepconv.errors.ConfigError`), so that no number enters the text except through
        the data."""
        literal = re.sub(r"\{[^}]*\}", " ", template)
        if numbers(literal):
            raise ConfigError(f"report template has literal numbers (pass them as values): {template!r}")
        store = self.data.setdefault("values", {})
        for k, v in values.items():
            if k in store and store[k] != json_safe(v):
                raise ConfigError(f"report section {self.key!r}: value {k!r} given twice ({store[k]!r}, then "
                                  f"{json_safe(v)!r}); name each number of a section once")
            store[k] = json_safe(v)
        self.blocks.append(template.format(**{k: fmt(json_safe(v)) for k, v in values.items()}))

    def text(self, text: str) -> None:
        """A paragraph without numbers."""
        self.fill(text.replace("{", "{{").replace("}", "}}"))

    def table(self, key: str, columns: list[str], rows: list[dict], caption: str | None = None) -> None:
        """A Markdown table of ``rows`` (dicts keyed by ``columns``), stored as ``data[key]``."""
        rows = [json_safe({c: r.get(c) for c in columns}) for r in rows]
        self.data[key] = rows
        out = []
        if caption:
            self.text(caption)
        out.append("| " + " | ".join(columns) + " |")
        out.append("|" + "---|" * len(columns))
        for r in rows:
            out.append("| " + " | ".join(fmt(r[c]) for c in columns) + " |")
        self.blocks.append("\n".join(out))

    def plot(self, name: str, draw: Callable[[Any], None], caption: str) -> None:
        """A PNG plot ``plots/<key>_<name>.png``; ``draw(ax)`` draws on a matplotlib axis."""
        fname = f"{self.key}_{name}.png"

        def render(path: Path) -> None:
            # NB: pyplot takes ~0.4 s to import and only writing a plot needs it, so it is imported here.
            import matplotlib  # noqa: PLC0415

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt  # noqa: PLC0415

            fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
            draw(ax)
            fig.tight_layout()
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png")
            plt.close(fig)

        self.plots[fname] = render
        self.data.setdefault("plots", []).append(f"plots/{fname}")
        self.text(caption)
        self.blocks.append(f"![{name}](plots/{fname})")

    def word(self, held: bool | None) -> str:
        """A part's verdict inside a sentence: ``held``, ``did not hold``, ``inconclusive`` (``not a test``
        in a quick-mode run)."""
        return "not a test" if self.quick else verdict_word(held).lower()

    def evidence(self, key: str, comparisons: list[Comparison], caption: str | None = None) -> None:
        """A table of paired comparisons (:func:`sepconv.evidence.compare`): what is compared, the side
        of the claim, the number of paired draws, the mean difference, its interval and the verdict
        ("not a test" in a quick-mode run). Stored as ``data[key]`` with every field of each comparison."""
        rows = [{"comparison": c.what, "claim": c.side, "draws": c.n, "mean": c.mean, "lo": c.lo, "hi": c.hi,
                 "verdict": self.word(c.held)} for c in comparisons]
        if caption is None:
            self.fill(f"Paired comparisons, treatment minus control per draw (a seed, testing its own fold; or "
                      f"an interleaved timing repeat where the row says so): the mean difference and its "
                      f"{{{key}_level}} % Student-t interval (lo to hi). A claim holds when the interval lies on "
                      "its side, fails when it lies wholly on the other, and is inconclusive otherwise.",
                      **{f"{key}_level": round(100 * comparisons[0].level)})
        self.table(key, ["comparison", "claim", "draws", "mean", "lo", "hi", "verdict"], rows, caption=caption)
        self.data[key + "_detail"] = [json_safe(c.__dict__) for c in comparisons]

    def verdict(self, held: bool | None, because: str, **values: Any) -> None:
        """Whether the paper's claim held in our measurement, and why (a template as in fill). In a
        quick-mode run (tiny budgets) no claim is tested: the verdict reads "Not a test (quick mode)",
        ``held`` is None and the rule's outcome on the quick numbers is kept as ``quick_outcome``."""
        if self.quick:
            self.data["held"], self.data["quick_outcome"] = None, held
            word = "**Not a test (quick mode).**"
        else:
            self.data["held"] = held
            word = f"**{verdict_word(held)}.**"
        self.fill(word + " " + because, **values)
        self.data["verdict"] = self.blocks[-1]


class Report:
    def __init__(self, title: str, meta: dict | None = None):
        self.title = title
        self.meta = json_safe(meta or {})
        self.sections: list[Section] = []
        #: the run's own description (data, budget, machine), rendered under the title
        self.run = Section("run", "", "", "")

    def section(self, key: str, title: str, claim: str, paper: str) -> Section:
        s = Section(key, title, claim, paper, quick=bool(self.meta.get("quick", False)))
        self.sections.append(s)
        return s

    def to_dict(self) -> dict:
        return {
            "title": self.title,
            "meta": self.meta,
            "run": self.run.data,
            "sections": {s.key: {"title": s.title, "paper": s.paper, "claim": s.claim, **s.data}
                         for s in self.sections},
        }

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for b in self.run.blocks:
            lines += [b, ""]
        for s in self.sections:
            lines += ["", f"## {s.title}", "", f"*{s.paper}*", "", f"> **Claim.** {s.claim}", ""]
            for b in s.blocks:
                lines += [b, ""]
        return "\n".join(lines).rstrip() + "\n"

    def write(self, out: str | Path) -> Path:
        out = Path(out)
        (out / "plots").mkdir(parents=True, exist_ok=True)
        for s in [self.run, *self.sections]:
            for fname, render in s.plots.items():
                render(out / "plots" / fname)
        atomic_write_text(out / "report.json", json.dumps(self.to_dict(), indent=2) + "\n")
        atomic_write_text(out / "report.md", self.markdown())
        return out / "report.md"


#: The block of a README that :func:`update_readme` rewrites.
README_START, README_END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"


def results_summary(doc: dict) -> str:
    """A short Markdown summary of a report's JSON: the run line, then each section's verdict."""
    lines = [*doc.get("run", {}).get("summary", [])]
    for s in doc["sections"].values():
        lines.append(f"- **{s['title']}** -- {s.get('verdict', '(no verdict)')}")
    return "\n".join(lines)


def check_readme(readme: str | Path) -> str:
    """The text of ``readme``; a clear error unless it has a results block to rewrite."""
    readme = Path(readme)
    text = readme.read_text() if readme.is_file() else ""
    if README_START not in text or README_END not in text:
        raise ConfigError(f"{readme}: no '{README_START}' ... '{README_END}' block to rewrite")
    return text


def update_readme(readme: str | Path, report_dir: str | Path) -> None:
    """Rewrite the block between :data:`README_START` and :data:`README_END` of ``readme`` with
    :func:`results_summary` of ``report_dir/report.json`` (so the README's results section is
    generated from a demo run, never typed by hand)."""
    readme, report_dir = Path(readme), Path(report_dir)
    text = check_readme(readme)
    doc = json.loads((report_dir / "report.json").read_text())
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    rel = Path(os.path.relpath(report_dir.resolve(), readme.resolve().parent)).as_posix()
    body = (f"{README_START}\n*Generated by `sepconv demo --out {rel} --readme {readme.name}` from "
            f"`{rel}/report.json`; the full report with tables and plots: [{rel}/report.md]({rel}/report.md).*"
            f"\n\n{results_summary(doc)}\n{README_END}")
    atomic_write_text(readme, head + body + tail)
