"""No code path of the package grants ``trust_code`` on its own: every ``trust_code=`` in what ships passes
the caller's value along -- a function's own ``trust_code`` parameter or the command line's
``--trust-code`` flag (``args.trust_code``). A literal ``True``, or a value read from anywhere else (a
config file, a saved run), would let a model directory's config.json run code nobody asked for."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "sepconv"
#: everything that ships and runs: the package, the benchmarks and the tools
SHIPPED = (SRC, ROOT / "benchmarks", ROOT / "tools")
#: the loaders that take trust, and the positional index of their trust_code parameter
LOADERS = {"load_model": 2, "build_from_config": 1, "model_from_spec": None, "build_model": 4, "train": 7}


def _passed_along(value: ast.expr) -> bool:
    """``trust_code`` (the caller's parameter) or ``args.trust_code`` (the CLI flag)."""
    return ((isinstance(value, ast.Name) and value.id == "trust_code")
            or (isinstance(value, ast.Attribute) and value.attr == "trust_code"
                and isinstance(value.value, ast.Name) and value.value.id == "args"))


def test_every_trust_code_in_the_package_is_the_callers_own():
    found, seen = [], 0
    for path in sorted(p for d in SHIPPED for p in d.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            for kw in node.keywords:
                if kw.arg == "trust_code":
                    seen += 1
                    if not _passed_along(kw.value):
                        found.append(f"{where}: trust_code={ast.unparse(kw.value)}")
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            pos = LOADERS.get(name)
            if pos is not None and len(node.args) > pos:  # trust given positionally
                found.append(f"{where}: {ast.unparse(node)}")
    assert not found, found
    assert seen >= 5  # the scan sees the callers that pass trust along
