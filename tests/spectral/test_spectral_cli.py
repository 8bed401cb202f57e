"""The ``sepconv spectrum`` command."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from sepconv.cli import main
from sepconv.models import create_model


def test_spectrum_prints_a_table_with_ratios_and_a_network_bound(capsys):
    assert main(["spectrum", "simple_cnn", "--input-size", "8", "8", "--method", "exact", "fft", "fantastic4"]) == 0
    out = capsys.readouterr().out
    assert "features.0" in out and "fft/exact" in out and "classifier" in out
    assert "network Lipschitz bound (upper, certified)" in out


def test_spectrum_json_and_plot_with_weights(tmp_path, capsys):
    model = create_model("simple_cnn", num_classes=7)
    weights = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(weights))
    png = tmp_path / "spec.png"
    argv = ["spectrum", "simple_cnn", "--weights", str(weights), "--num-classes", "7", "--input-size", "8", "6",
            "--method", "exact", "upper", "fft", "--json", "--plot", str(png), "--layer", "features.3"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    n_layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    assert doc["input_shape"] == [3, 8, 6] and len(doc["layers"]) == n_layers and doc["plotted_layer"] == "features.3"
    w = model.features[0].weight.detach().double()
    from sepconv.spectral import ConvSpec, spectral_norm

    first = doc["layers"][0]
    exact = first["values"]["exact"]
    assert abs(exact - float(spectral_norm(w, ConvSpec((8, 6), 1, 1)))) <= 1e-4 * exact
    assert first["values"]["upper"] >= first["values"]["exact"] and doc["lipschitz_bound"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spectrum_bad_input_is_one_line_with_status_2(tmp_path, capsys):
    assert main(["spectrum", "no_such_model"]) == 2
    assert main(["spectrum", "simple_cnn", "--input-size", "8", "8", "--plot", str(tmp_path / "p.png"),
                 "--layer", "nope", "--method", "fft"]) == 2
    bad = tmp_path / "bad.pt"
    torch.save({"x": torch.zeros(1)}, bad)
    assert main(["spectrum", "simple_cnn", "--weights", str(bad)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 3 and all(line.startswith("sepconv spectrum: error:") for line in err)
    assert "no_such_model" in err[0] and "'nope'" in err[1] and "does not match the model" in err[2]
