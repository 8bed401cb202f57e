"""`sepconv models`: the registry with parameters and FLOPs."""

from sepconv.cli import main


def test_models_lists_parameters_and_flops_at_the_default_input(capsys):
    assert main(["models", "resnet*"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["model", "family", "input", "classes", "params", "MFLOPs", "conv="]
    rows = {line.split()[0]: line.split() for line in out[1:]}
    assert set(rows) == {"resnet18", "resnet20", "resnet32", "resnet34", "resnet44", "resnet50", "resnet56",
                         "resnet110"}
    assert rows["resnet18"][1:5] == ["resnet", "224x224", "1000", "11,689,512"]
    assert rows["resnet18"][5] == "3,628.1"  # 1.814 G multiply-adds
    assert rows["resnet20"][2:5] == ["32x32", "10", "269,722"]


def test_models_conv_flag_profiles_that_flavour_and_skips_models_without_it(capsys):
    assert main(["models", "*mobilenet*", "--conv", "bsconv_u", "--num-classes", "100", "--no-flops"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["cifar_mobilenet_v1", "mobilenet_v1"]
    assert all(r[3] == "100" and r[5] == "-" for r in rows)


def test_models_without_a_match_is_one_line_and_status_2(capsys):
    assert main(["models", "shufflenet*", "--conv", "bsconv_s"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no registered model" in err
