"""The digits toy: data split, models, shipped weights, backbone metrics and the training functions."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tdm.core.sampling import guided, rollout, uniform_grid
from tdm.toys.digits import (
    CLASSIFIER_FILE,
    NULL_CLASS,
    TEACHER_FILE,
    DigitsBackbone,
    DigitsUNet,
    classifier_accuracy,
    load_classifier,
    load_digits_split,
    load_teacher,
    train_classifier,
    train_teacher,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def backbone() -> DigitsBackbone:
    return DigitsBackbone()


def test_split_is_deterministic_stratified_and_partitions_the_data():
    from sklearn.datasets import load_digits

    first, second = load_digits_split(), load_digits_split()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    train_x, train_y, heldout_x, heldout_y = first
    assert train_x.shape[1:] == (1, 8, 8) and train_x.dtype == torch.float32 and train_y.dtype == torch.long
    assert train_x.min() == -1 and train_x.max() == 1
    # train + held-out is exactly the full data set (as a multiset of (image, label) rows): disjoint and complete
    data = load_digits()
    full = np.concatenate([data.images.reshape(-1, 64) / 8 - 1, data.target[:, None]], axis=1)
    split = torch.cat([torch.cat([train_x, heldout_x]).flatten(1), torch.cat([train_y, heldout_y])[:, None]], 1)
    assert sorted(map(tuple, full.tolist())) == sorted(map(tuple, split.double().tolist()))
    fraction = torch.bincount(heldout_y, minlength=10) / torch.bincount(torch.cat([train_y, heldout_y]))
    assert ((fraction - 0.2).abs() < 0.02).all()


def test_unet_shape_and_null_class_changes_output():
    torch.manual_seed(0)
    model = DigitsUNet()
    for p in model.parameters():  # the zero-initialised output layers would hide the conditioning
        p.data.normal_(0, 0.1)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    out_label = model(x, t, torch.full((4,), 3))
    out_null = model(x, t, torch.full((4,), NULL_CLASS))
    assert out_label.shape == (4, 1, 8, 8)
    assert not torch.allclose(out_label, out_null)
    assert model(x, t.float(), torch.full((4,), 3)).allclose(out_label)  # float and long t agree


def test_shipped_teacher_gives_class_conditional_digits(backbone):
    cond = backbone.evaluation_conditions(200)
    noise = torch.randn(200, *backbone.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        samples = rollout(guided(backbone.teacher, backbone.null_condition(200), 2.0), noise, cond,
                          uniform_grid(1000, 20), backbone.schedule, backbone.prediction)
    assert samples.shape == (200, 1, 8, 8)
    assert backbone.metrics(samples, cond)["class_accuracy"] > 0.8


def test_shipped_classifier_is_accurate_on_heldout():
    _, _, heldout_x, heldout_y = load_digits_split()
    assert classifier_accuracy(load_classifier(), heldout_x, heldout_y) > 0.9


def test_metrics_and_conditions(backbone):
    train_x, train_y, _, _ = load_digits_split()
    metrics = backbone.metrics(train_x, train_y)
    assert set(metrics) == {"fd_train", "fd_heldout", "class_accuracy"}
    assert abs(metrics["fd_train"]) < 1e-3
    assert metrics["fd_heldout"] > metrics["fd_train"]
    assert metrics["class_accuracy"] > 0.95
    assert backbone.features(train_x[:5]).shape[0] == 5
    labels = backbone.sample_conditions(1000, torch.Generator().manual_seed(0))
    assert labels.dtype == torch.long and labels.min() == 0 and labels.max() == 9
    assert (backbone.null_condition(3) == NULL_CLASS).all()
    assert torch.equal(torch.bincount(backbone.evaluation_conditions(50)), torch.full((10,), 5))
    images = backbone.to_images(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]).reshape(5, 1, 1, 1))
    assert images.flatten().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_training_functions_write_loadable_files_atomically(tmp_path):
    teacher_path = train_teacher(tmp_path, steps=3, batch_size=8, log_every=0)
    classifier_path = train_classifier(tmp_path, steps=3, batch_size=8, log_every=0)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([TEACHER_FILE, CLASSIFIER_FILE, "digits_teacher.json", "digits_classifier.json"])
    assert isinstance(load_teacher(tmp_path), DigitsUNet)
    assert load_classifier(classifier_path).training is False
    assert DigitsBackbone(str(teacher_path)).teacher.training is False
    # same seed, same weights
    again = train_teacher(tmp_path / "again", steps=3, batch_size=8, log_every=0)
    first, second = load_file(str(teacher_path)), load_file(str(again))
    assert all(torch.equal(first[k], second[k]) for k in first)
