"""Stratified k-fold cross-validation: kfold_indices, SubsetDataset, load_dataset(folds=, fold=), TrainConfig."""

import numpy as np
import pytest
import torch

from sepconv.data import SubsetDataset, kfold_indices, load_dataset
from sepconv.errors import ConfigError, DataError
from sepconv.train import TrainConfig, train

N_DIGITS = 1797


@pytest.fixture(scope="module")
def digits():
    return {s: load_dataset("digits", split=s, image_size=8) for s in ("train", "test")}


@pytest.fixture(scope="module")
def pool_targets(digits):
    return np.concatenate([digits["train"].targets.numpy(), digits["test"].targets.numpy()])


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_test_folds_partition_the_pool_and_are_stratified(pool_targets, k):
    folds = [kfold_indices(pool_targets, k, i) for i in range(k)]
    assert all(np.array_equal(f, np.sort(f)) for f in folds)
    everything = np.concatenate(folds)
    assert len(everything) == N_DIGITS and np.array_equal(np.sort(everything), np.arange(N_DIGITS))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    counts = np.stack([np.bincount(pool_targets[f], minlength=10) for f in folds])
    assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all()


def test_kfold_indices_is_deterministic_and_seeded(pool_targets):
    assert np.array_equal(kfold_indices(pool_targets, 3, 1), kfold_indices(pool_targets, 3, 1))
    assert not np.array_equal(kfold_indices(pool_targets, 3, 1), kfold_indices(pool_targets, 3, 1, seed=1))


def test_kfold_indices_refuses_bad_folds(pool_targets):
    for folds, fold, word in [(1, 0, "folds"), (0, 0, "folds"), (None, 0, "folds"), (3, 3, "fold"), (3, -1, "fold")]:
        with pytest.raises(ConfigError, match=word):
            kfold_indices(pool_targets, folds, fold)


def test_train_and_test_of_a_fold_split_the_pool(digits):
    train_set = load_dataset("digits", split="train", image_size=8, folds=3, fold=1)
    test_set = load_dataset("digits", split="test", image_size=8, folds=3, fold=1)
    assert isinstance(test_set, SubsetDataset) and (train_set.split, test_set.split) == ("train", "test")
    assert len(test_set) == 599 and len(train_set) == N_DIGITS - 599
    assert set(train_set.indices.tolist()).isdisjoint(test_set.indices.tolist())
    assert sorted(train_set.indices.tolist() + test_set.indices.tolist()) == list(range(N_DIGITS))
    again = load_dataset("digits", split="test", image_size=8, folds=3, fold=1)
    assert torch.equal(again.indices, test_set.indices)
    # the normalization is the dataset's own train split's, not refitted per fold
    for ds in (train_set, test_set):
        assert (ds.mean, ds.std) == (digits["train"].mean, digits["train"].std)
        assert (ds.classes, ds.in_chans, ds.image_size, ds.flip_ok) == (
            digits["train"].classes, 1, (8, 8), digits["train"].flip_ok)


def test_every_image_is_tested_once_over_the_folds():
    seen = torch.cat([load_dataset("digits", split="test", image_size=8, folds=4, fold=i).indices for i in range(4)])
    assert sorted(seen.tolist()) == list(range(N_DIGITS))


def test_get_batch_reads_the_parents_images(digits):
    test_set = load_dataset("digits", split="test", image_size=8, folds=3, fold=1)
    n_train = len(digits["train"])
    picks = [0, 1, 5, len(test_set) - 1, 300, 2]  # unsorted, both parents
    glob = test_set.indices[picks]
    assert (glob < n_train).any() and (glob >= n_train).any()
    x, y = test_set.get_batch(picks)
    for row, g in enumerate(glob.tolist()):
        parent, i = (digits["train"], g) if g < n_train else (digits["test"], g - n_train)
        px, py = parent.get_batch([i])
        assert torch.equal(x[row], px[0]) and int(y[row]) == int(py[0])
    x0, y0 = test_set[len(test_set) - 1]
    assert torch.equal(x0, x[3]) and y0 == int(y[3])


def test_subset_dataset_refuses_parents_that_differ(digits):
    other = load_dataset("digits", split="test", image_size=16)
    with pytest.raises(DataError, match="image_size"):
        SubsetDataset([digits["train"], other], [0], split="train")
    with pytest.raises(DataError, match="indices"):
        SubsetDataset([digits["train"], digits["test"]], [N_DIGITS], split="train")


@pytest.mark.parametrize("folds,fold,word", [(1, 0, "folds must be an integer >= 2"), (True, 0, "folds"),
                                             (2.0, 0, "folds"), ("3", 0, "folds"), (-2, 0, "folds"),
                                             (3, 3, r"fold must be in 0\.\.2"), (3, -1, r"fold must be in 0\.\.2"),
                                             (3, 1.0, "fold must be an integer"), (None, 1, "fold 1 needs folds")])
def test_load_dataset_refuses_bad_folds(folds, fold, word):
    with pytest.raises(ConfigError, match=word) as e:
        load_dataset("digits", split="test", image_size=8, folds=folds, fold=fold)
    assert "\n" not in str(e.value)


def test_more_folds_than_the_smallest_class_is_a_data_error():
    # digits' smallest class has 174 images
    with pytest.raises(DataError, match=r"digits: 175 folds need at least 175 images of every class") as e:
        load_dataset("digits", split="train", image_size=8, folds=175, fold=0)
    assert not isinstance(e.value, ConfigError)
    assert len(load_dataset("digits", split="test", image_size=8, folds=174, fold=0)) in (10, 11)


def test_train_config_folds_round_trip_and_old_configs_load():
    cfg = TrainConfig(folds=3, fold=2).validate()
    back = TrainConfig.from_dict(cfg.to_dict())
    assert (back.folds, back.fold) == (3, 2) and back == cfg
    old = cfg.to_dict()
    del old["folds"], old["fold"]
    loaded = TrainConfig.from_dict(old).validate()
    assert (loaded.folds, loaded.fold) == (0, 0)
    for kwargs, word in [(dict(folds=1), "folds"), (dict(folds=3, fold=3), "fold must be in 0..2"),
                         (dict(fold=1), "fold 1 needs folds")]:
        with pytest.raises(ConfigError, match=word):
            TrainConfig(**kwargs).validate()


def test_a_training_run_tests_on_its_fold(tmp_path, monkeypatch):
    import sepconv.train.run as run

    sizes = []

    def evaluate(net, test_set, *args, **kw):
        sizes.append(len(test_set))
        return real(net, test_set, *args, **kw)

    real = run.evaluate
    monkeypatch.setattr(run, "evaluate", evaluate)
    torch.set_num_threads(1)
    cfg = TrainConfig(model="simple_cnn", width=0.5, data="digits", image_size=8, folds=3, fold=1, train_images=64,
                      batch_size=32, epochs=1, out=str(tmp_path))
    res = train(cfg, progress=False)
    assert sizes == [599] and res.history[0]["steps"] == 2
    assert 0 <= res.history[0]["test_acc"] <= 1


def test_cli_flags_reach_the_config():
    import argparse

    from sepconv.cli import train as cli_train

    p = argparse.ArgumentParser()
    cli_train.add(p.add_subparsers())
    cfg = cli_train.train_config(p.parse_args(["train", "--folds", "5", "--fold", "4"]))
    assert (cfg.folds, cfg.fold) == (5, 4)
    assert (cli_train.train_config(p.parse_args(["train"])).folds, 0) == (0, 0)
    for bad in (["--folds", "1"], ["--fold", "-1"]):
        with pytest.raises(SystemExit):
            p.parse_args(["train", *bad])


def test_cli_fold_out_of_range_is_one_line_exit_2(tmp_path, capsys):
    from sepconv.cli import main

    code = main(["train", "--folds", "3", "--fold", "3", "--no-progress", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "fold must be in 0..2" in err
    assert not (tmp_path / "x").exists()
