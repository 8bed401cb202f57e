"""The README's Python tour runs as printed: its public names keep working (issue 14)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3, "the README lost its Python tour"
    monkeypatch.chdir(tmp_path)  # save_model writes runs/... relative to here
    images = torch.randn(4, 3, 32, 32)
    loader = [(images, torch.randint(10, (4,)))]  # what certified_radii iterates over
    scope = {"loader": loader}
    exec(compile("\n".join(blocks), str(README), "exec"), scope)  # noqa: S102 -- our own README
    assert (tmp_path / "runs" / "resnet20-dsc" / "config.json").is_file()
    assert scope["summary"].certified in (True, False)
    assert scope["L"] > 0 and scope["radii"].shape == (4,)
