"""Label recovery from the classifier layer's update."""
from __future__ import annotations

import torch

from attacks.labels import count_rule, last_layer_names, recover_labels
from attacks.synthetic import make_case

torch.set_num_threads(1)


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_sign_rule_exact_for_every_class():
    num_classes = 10
    imgs = _images(num_classes)
    for c in range(num_classes):
        case = make_case("lenet", num_classes, imgs[c:c + 1], torch.tensor([c]), seed=c)
        model = case.build_model()
        got = recover_labels(case.update, case.update_kind, model, 1)
        assert got.tolist() == [c]


def test_sign_rule_on_resnet_and_weight_diff():
    # ReLU features, BatchNorm in train mode; FedAvg weight differences are negated gradients.
    img = _images(1, 64)
    case = make_case("resnet18", 5, img, torch.tensor([2]))
    assert recover_labels(case.update, "gradient", case.build_model(), 1).tolist() == [2]
    case = make_case("lenet", 10, _images(1), torch.tensor([6]), update_kind="weight-diff",
                     local_lr=0.1, local_steps=2)
    assert recover_labels(case.update, case.update_kind, case.build_model(), 1).tolist() == [6]
    # Without the negation the rule would not find it: the test can fail.
    assert recover_labels(case.update, "gradient", case.build_model(), 1).tolist() != [6]


def test_batch_of_four_distinct_labels():
    labels = torch.tensor([7, 1, 4, 9])
    case = make_case("lenet", 10, _images(4), labels)
    model = case.build_model()
    for rule in ("negative-bias", "count", "auto"):
        got = recover_labels(case.update, case.update_kind, model, 4, rule)
        assert sorted(got.tolist()) == sorted(labels.tolist()), rule


def test_count_rule_with_repeats():
    labels = torch.tensor([2, 2, 2, 5])
    case = make_case("lenet", 10, _images(4, seed=3), labels)
    got = recover_labels(case.update, case.update_kind, case.build_model(), 4, "count")
    assert got.tolist() == [2, 2, 2, 5]


def test_count_rule_arithmetic():
    # db_i = pbar - c_i / n with pbar = 0.1, n = 5, counts {1: 3, 4: 2}
    db = torch.full((10,), 0.1)
    db[1] -= 3 / 5
    db[4] -= 2 / 5
    assert count_rule(torch.zeros(10, 3), db, 5).tolist() == [1, 1, 1, 4, 4]


def test_last_layer_names():
    case = make_case("lenet", 10, _images(1), torch.tensor([0]))
    assert last_layer_names(case.build_model()) == ("fc.weight", "fc.bias")
