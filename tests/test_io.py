import json
import os
import pickle

import pytest
import torch

from sepconv.errors import ModelError, WeightsError
from sepconv.io import (
    atomic_path,
    load_model,
    load_state_dict,
    model_from_spec,
    record_recipe,
    register_recipe,
    save_model,
)
from sepconv.models import create_model


def test_saved_model_reloads_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    m = create_model("simple_cnn", num_classes=7, in_chans=1, width=0.5).eval()
    save_model(m, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["name"] == "simple_cnn" and cfg["kwargs"]["num_classes"] == 7
    m2 = load_model(tmp_path / "m").eval()
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(m(x), m2(x))


def test_recipe_steps_are_replayed_before_weights_load(tmp_path):
    @register_recipe("test_widen_classifier")
    def widen(model, step):
        model.classifier = torch.nn.Linear(model.classifier.in_features, step["classes"])
        return model

    m = create_model("simple_cnn", num_classes=3)
    widen(m, {"classes": 5})
    record_recipe(m, "test_widen_classifier", classes=5)
    save_model(m, tmp_path / "m")
    m2 = load_model(tmp_path / "m")
    assert m2.classifier.out_features == 5
    assert m2.sepconv_config["recipe"] == [{"op": "test_widen_classifier", "classes": 5}]


def test_pickle_payload_in_pt_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": Payload()}, f)
    with pytest.raises(WeightsError, match="evil.pt"):
        load_state_dict(path)
    assert not marker.exists()


def test_weights_only_pt_and_safetensors_files_load(tmp_path):
    sd = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    torch.save(sd, tmp_path / "w.pt")
    assert torch.equal(load_state_dict(tmp_path / "w.pt")["a"], sd["a"])
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_state_dict(tmp_path / "w.safetensors")["b"], sd["b"])


def test_corrupt_and_missing_files_give_one_line_errors(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    for name in ("bad.safetensors", "bad.pt", "missing.pt"):
        with pytest.raises(WeightsError, match=name) as e:
            load_state_dict(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(WeightsError, match="config.json"):
        load_model(tmp_path)


def test_mismatched_weights_name_the_key(tmp_path):
    m = create_model("simple_cnn", num_classes=3)
    save_model(m, tmp_path / "m")
    other = create_model("simple_cnn", num_classes=4)
    from safetensors.torch import save_model as st_save

    st_save(other, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(WeightsError, match="classifier"):
        load_model(tmp_path / "m")


def test_interrupted_atomic_write_leaves_old_file_untouched(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_model_spec_accepts_registry_names_directories_and_factories(tmp_path):
    m = model_from_spec("simple_cnn", num_classes=4, in_chans=1)
    assert m.classifier.out_features == 4
    save_model(m, tmp_path / "d")
    assert model_from_spec(str(tmp_path / "d")).classifier.out_features == 4
    f = model_from_spec("sepconv.models.simple:SimpleCNN", num_classes=6)
    assert f.classifier.out_features == 6
    with pytest.raises(ModelError, match="nosuchmodule"):
        model_from_spec("nosuchmodule:fn")


def test_factory_configs_need_trust(tmp_path):
    m = model_from_spec("sepconv.models.simple:SimpleCNN", num_classes=6)
    save_model(m, tmp_path / "d")
    with pytest.raises(WeightsError, match="trust_code"):
        load_model(tmp_path / "d")
    assert load_model(tmp_path / "d", trust_code=True).classifier.out_features == 6
