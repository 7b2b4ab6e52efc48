"""utils/lottery/stability.py: the error barrier on the linear path between two networks (docs/design.md section 9)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from examples.custom import build_net
from utils.lottery import stability
from utils.models.mask_layers import get_masks, masked_layers, prepare_model, set_masks
from utils.training.step import evaluate


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    labels = torch.tensor(data.target)
    return images[:1200], labels[:1200], images[1200:], labels[1200:]


def batches_of(images, labels, batch_size=100):
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def mlp(seed: int, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return prepare_model(nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10)))


def train(model: nn.Module, images, labels, order_seed: int, epochs: int = 4, lr: float = 0.1) -> nn.Module:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(order_seed)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 32):
            index = order[start:start + 32]
            loss = nn.functional.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for _, layer in masked_layers(model):
                    layer.weight.mul_(layer.mask)
    return model


def own_evaluation(model, state, test):
    model = copy.deepcopy(model)
    model.load_state_dict(state)
    loss, correct, count = evaluate(model, test)
    return loss / count, 100.0 * correct / count


def test_alphas_are_evenly_spaced_with_exact_ends():
    assert stability.alphas(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert stability.alphas(2) == [0.0, 1.0]
    with pytest.raises(ValueError):
        stability.alphas(1)


def test_identical_networks_have_no_barrier(digits):
    train_x, train_y, test_x, test_y = digits
    model = train(mlp(0), train_x, train_y, order_seed=1, epochs=1)
    state = model.state_dict()
    result = stability.evaluate_path(model, state, copy.deepcopy(state), train_batches=lambda: [],
                                     test_batches=lambda: batches_of(test_x, test_y), points=5)
    accuracies = {round(p.test_acc, 9) for p in result.points}
    assert len(accuracies) == 1 and result.instability == 0.0


def test_two_independently_trained_networks_have_a_barrier_and_the_ends_are_their_own(digits):
    """Two small MLPs from different random inits and data orders land in different basins
    (hidden units permuted): the path's middle is worse than both ends."""
    train_x, train_y, test_x, test_y = digits
    a = train(mlp(0), train_x, train_y, order_seed=1)
    b = train(mlp(100), train_x, train_y, order_seed=2)
    test = lambda: batches_of(test_x, test_y)
    result = stability.evaluate_path(a, a.state_dict(), b.state_dict(), train_batches=lambda: [],
                                     test_batches=test, points=5)
    ends = [result.points[0], result.points[-1]]
    for point, network in zip(ends, (a, b)):
        loss, acc = own_evaluation(a, network.state_dict(), test())
        assert point.test_loss == pytest.approx(loss, rel=1e-12) and point.test_acc == acc
    middle = result.points[2]
    assert middle.test_error > max(p.test_error for p in ends)
    expected = max(p.test_error for p in result.points) - (ends[0].test_error + ends[1].test_error) / 2
    assert result.instability == pytest.approx(expected) and result.instability > 2.0


def test_batchnorm_is_reestimated_inside_the_path_and_the_ends_keep_their_own_statistics(digits):
    train_x, train_y, test_x, test_y = digits
    torch.manual_seed(0)
    template = prepare_model(build_net(num_classes=10, in_channels=1, image_size=8))
    a = train(copy.deepcopy(template), train_x, train_y, order_seed=1, epochs=1, lr=0.05)
    b = train(copy.deepcopy(template), train_x, train_y, order_seed=2, epochs=1, lr=0.05)
    drawn = []

    def train_batches():
        drawn.append(1)
        return batches_of(train_x, train_y)

    test = lambda: batches_of(test_x, test_y)
    result = stability.evaluate_path(template, a.state_dict(), b.state_dict(), train_batches=train_batches,
                                     test_batches=test, points=3, bn_batches=4)
    assert [p.bn_reestimated for p in result.points] == [False, True, False] and len(drawn) == 1
    assert result.points[0].test_acc == own_evaluation(template, a.state_dict(), test())[1]
    assert result.points[-1].test_acc == own_evaluation(template, b.state_dict(), test())[1]
    both = stability.evaluate_path(template, a.state_dict(), a.state_dict(), train_batches=train_batches,
                                   test_batches=test, points=3, bn_batches=4, reestimate_endpoints=True)
    assert all(p.bn_reestimated for p in both.points) and both.instability == 0.0
    assert torch.equal(template.state_dict()["1.running_mean"], torch.zeros(16))  # the template is untouched


def test_reestimation_is_the_mean_of_the_batch_statistics_and_restores_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Dropout(0.5))
    model.train()
    batches = [(torch.randn(10, 4), torch.zeros(10, dtype=torch.long)) for _ in range(3)]
    used = stability.reestimate_batchnorm_(model, iter(batches + batches), 3)
    with torch.no_grad():
        means = torch.stack([model[0](x).mean(0) for x, _ in batches])
    assert used == 3
    assert torch.allclose(model[1].running_mean, means.mean(0), atol=1e-6)
    assert model[1].momentum == 0.1 and model.training and model[2].training
    with pytest.raises(ValueError, match="asked for 5 batches"):
        stability.reestimate_batchnorm_(model, batches, 5)


def test_pruned_weights_stay_zero_on_the_path_and_masks_must_match():
    model = mlp(0)
    masks = get_masks(model)
    masks["1"][:, :32] = False
    set_masks(model, masks)
    a = model.state_dict()
    b = {k: (v + 1.0 if v.is_floating_point() else v.clone()) for k, v in a.items()}  # nonzero where pruned
    work = stability.load_interpolated_(copy.deepcopy(model), a, b, 0.5)
    assert bool((work[1].weight[:, :32] == 0).all()) and bool((work[1].weight[:, 32:] != 0).any())
    other = copy.deepcopy(b)
    other["1.mask"] = other["1.mask"].clone()
    other["1.mask"][0, 0] = True
    with pytest.raises(ValueError, match="different masks"):
        stability.evaluate_path(model, a, other, train_batches=lambda: [], test_batches=lambda: [], points=3)


def test_rows_for_stability_csv():
    points = [stability.PathPoint(0.0, 0.5, 90.0, False), stability.PathPoint(0.5, 1.0, 70.0, True),
              stability.PathPoint(1.0, 0.4, 92.0, False)]
    result = stability.StabilityResult(points, stability.instability(points))
    assert result.instability == pytest.approx(30.0 - 9.0)
    assert list(result.rows(3)[1]) == stability.STABILITY_COLUMNS and result.rows(3)[1]["alpha"] == 0.5
