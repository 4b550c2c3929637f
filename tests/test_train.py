import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tlcourse import env, train


def _task(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return TensorDataset(x, y)


def test_fit_decreases_loss_and_learns():
    env.seed_everything(0)
    data = _task()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    hist = train.fit(model, train.make_loader(data, 32, shuffle=True), train.make_loader(data, 128), opt,
                     epochs=6, progress=False)
    assert hist["train_loss"][-1] < 0.6 * hist["train_loss"][0]
    assert hist["val_acc"][-1] > 0.9
    assert len(hist["lr"]) == 6 and hist.seconds > 0


def test_keep_best_restores_best_epoch_weights():
    env.seed_everything(1)
    data = _task(128, seed=1)
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    # After the first epoch (8 steps) the learning rate explodes, so later epochs get worse.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 8 else 1e4 * (-1) ** step)
    hist = train.fit(model, train.make_loader(data, 16, shuffle=True), train.make_loader(data, 128), opt,
                     epochs=4, scheduler=sched, progress=False)
    assert hist["val_acc"][-1] < max(hist["val_acc"])  # the last epoch is not the best one
    _, acc = train.evaluate(model, train.make_loader(data, 128))
    assert acc == hist.best_val_acc == max(hist["val_acc"])


def test_scheduler_steps_per_batch():
    data = _task(64)
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    train.fit(model, train.make_loader(data, 16), None, opt, epochs=1, scheduler=sched, progress=False)
    assert opt.param_groups[0]["lr"] == 1.0 / 5  # 4 batches -> 4 steps


def test_divergence_is_reported_before_the_weights_change():
    data = _task(32)
    model = nn.Linear(8, 2)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    bias_before = model.bias.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match="learning rate"):
        train.train_one_epoch(model, train.make_loader(data, 16), opt, progress=False)
    assert torch.equal(model.bias, bias_before)  # no step was taken with a NaN loss


def test_loader_uses_pinned_memory_only_on_cuda():
    data = _task(8)
    assert not train.make_loader(data, device="cpu").pin_memory
    loader = train.make_loader(data, device="cuda", num_workers=0)
    assert loader.pin_memory


def test_predict_returns_all_logits_and_labels():
    data = _task(40)
    logits, labels = train.predict(nn.Linear(8, 3), train.make_loader(data, 16))
    assert logits.shape == (40, 3) and torch.equal(labels, data.tensors[1])
