"""No code path of the package grants ``trust_code`` on its own: every ``trust_code=`` in ``src`` passes
the caller's value along (a literal ``True`` would let a model directory's config.json run code)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "sepconv"


def test_no_call_in_the_package_passes_a_literal_true_trust_code():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                for kw in node.keywords:  # a constant other than False grants trust nobody asked for
                    if kw.arg == "trust_code" and isinstance(kw.value, ast.Constant) and kw.value.value is not False:
                        found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not found, found
    assert any("trust_code" in p.read_text() for p in SRC.rglob("*.py"))  # the scan sees the callers
