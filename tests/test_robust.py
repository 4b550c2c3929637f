"""LP-FT's start, weight interpolation (WiSE-FT), uniform soups and Tent."""

import copy

import numpy as np
import pytest
import timm
import torch
from torch import nn

from tlcourse import features, finetune, robust


def _tiny(seed=0, num_classes=3):
    torch.manual_seed(seed)
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes).eval()


def test_start_from_probe_gives_the_probe_predictions():
    model = _tiny(num_classes=2)
    x = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    labels = (feats[:, 0] > feats[:, 0].median()).long()
    probe = features.linear_probe(feats, labels)
    robust.start_from_probe(model, probe)
    with torch.no_grad():
        predicted = model(x).argmax(1).numpy()
    assert np.array_equal(predicted, probe.predict(feats.numpy()))
    with pytest.raises(ValueError, match="probe takes 3 features"):
        robust.start_from_probe(_tiny(), features.linear_probe(np.random.rand(10, 3), np.arange(10) % 2))


def test_interpolate_ends_midpoint_and_integer_buffers():
    a, b = _tiny(0).state_dict(), _tiny(1).state_dict()
    assert all(torch.equal(robust.interpolate(a, b, 0.0)[k], a[k]) for k in a if a[k].is_floating_point())
    assert all(torch.equal(robust.interpolate(a, b, 1.0)[k], b[k]) for k in a)
    mid = robust.interpolate(a, b, 0.5)
    key = "conv_head.weight"
    assert torch.allclose(mid[key], (a[key] + b[key]) / 2)
    counts = [k for k in a if k.endswith("num_batches_tracked")]
    assert counts and all(mid[k].dtype == torch.long and torch.equal(mid[k], b[k]) for k in counts)
    model = _tiny(2)
    model.load_state_dict(mid)  # a loadable state dict of the same architecture


def test_interpolating_different_architectures_is_refused():
    with pytest.raises(ValueError, match="different tensors"):
        robust.interpolate(_tiny().state_dict(), nn.Linear(2, 2).state_dict(), 0.5)
    with pytest.raises(ValueError, match="shape"):
        robust.interpolate(_tiny(num_classes=3).state_dict(), _tiny(num_classes=4).state_dict(), 0.5)
    with pytest.raises(ValueError, match="at least one"):
        robust.uniform_soup([])


def test_uniform_soup_is_the_mean():
    states = [_tiny(s).state_dict() for s in range(3)]
    soup = robust.uniform_soup(states)
    key = "blocks.2.0.conv_pw.weight"
    assert torch.allclose(soup[key], sum(s[key] for s in states) / 3, atol=1e-7)
    assert torch.allclose(robust.uniform_soup(states[:2])[key], robust.interpolate(states[0], states[1], 0.5)[key])


def test_wise_ft_curve_scores_each_alpha():
    a, b = _tiny(0).state_dict(), _tiny(1).state_dict()
    key = "classifier.bias"
    rows = robust.wise_ft_curve(_tiny(5), a, b, [0.0, 0.25, 1.0],
                                lambda m: {"bias0": m.classifier.bias[0].item()})
    assert [r["alpha"] for r in rows] == [0.0, 0.25, 1.0]
    assert rows[1]["bias0"] == pytest.approx(0.75 * a[key][0].item() + 0.25 * b[key][0].item(), abs=1e-6)


def test_entropy_is_zero_for_certain_and_log_c_for_uniform():
    assert robust.entropy(torch.tensor([[100.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    assert robust.entropy(torch.zeros(4, 5)).item() == pytest.approx(np.log(5), abs=1e-6)


def _shifted_task(seed=0):
    # A small convolutional classifier trained on clean data, tested on data whose first
    # channel (the one that carries the class) is offset: every image looks like class 1 to
    # the source statistics, a shift that normalising by the test batches' statistics undoes.
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n, size = 256, 8
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    x[:, 0] += (2 * y - 1)[:, None, None].float()  # class in the first channel's mean
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    xt = torch.randn(n, 3, size, size, generator=g) * 0.5
    yt = torch.randint(0, 2, (n,), generator=g)
    xt[:, 0] += (2 * yt - 1)[:, None, None].float()
    xt[:, 0] += 2.0  # the shift
    return model, xt, yt


def test_tent_touches_only_batchnorm_affine_and_helps_under_shift():
    model, xt, yt = _shifted_task()
    before = copy.deepcopy(model.state_dict())
    none = robust.accuracy(lambda b: model(b), xt, yt)
    tent = robust.Tent(model, lr=1e-2, steps=1)
    adapted = robust.accuracy(tent, xt, yt, batch_size=64)
    # the original model is untouched; in Tent's copy only BN's weight and bias moved
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    changed = {n for n, p in tent.model.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])}
    assert changed and changed <= {"1.weight", "1.bias"}
    assert {id(p) for p in tent.params} == {id(tent.model[1].weight), id(tent.model[1].bias)}
    assert not tent.model[0].weight.requires_grad and not tent.model[5].weight.requires_grad
    # On this shift, normalising by the test batches' statistics restores most of the accuracy.
    assert none < 0.7 < adapted, (none, adapted)


def test_tent_episodic_resets_and_refuses_bad_input():
    model, xt, _ = _shifted_task()
    tent = robust.Tent(model, lr=1e-2, episodic=True)
    first = tent(xt[:32]).clone()
    tent(xt[32:64])
    assert torch.allclose(tent(xt[:32]), first, atol=1e-6)  # the same batch, the same answer
    with pytest.raises(ValueError, match="at least 2"):
        tent(xt[:1])
    with pytest.raises(ValueError, match="no BatchNorm"):
        robust.Tent(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least one step"):
        robust.Tent(model, steps=0)


def test_accuracy_never_gives_tent_a_batch_of_one():
    model, xt, yt = _shifted_task()
    tent = robust.Tent(model)
    acc = robust.accuracy(tent, xt[:65], yt[:65], batch_size=32)  # 32 + 33, not 32 + 32 + 1
    assert 0 <= acc <= 1


def test_tent_parameters_are_every_bn_affine():
    model = _tiny()
    params = robust.tent_parameters(model)
    assert len(params) == 2 * len(finetune.batchnorm_layers(model))


def test_tent_and_adabn_adapt_a_model_whose_batchnorm_was_kept_in_eval_mode():
    # A fine-tuned model from chapter 02's recipe keeps BN in eval mode (keep_batchnorm_eval);
    # test-time adaptation must still switch BN to batch statistics, not run with reset ones.
    from tlcourse import adapt

    model, xt, yt = _shifted_task()
    kept = finetune.keep_batchnorm_eval(copy.deepcopy(model))
    plain = robust.accuracy(robust.Tent(model, lr=1e-2), xt, yt, batch_size=64)
    assert robust.accuracy(robust.Tent(kept, lr=1e-2), xt, yt, batch_size=64) == plain
    adapted_plain = adapt.adabn(copy.deepcopy(model), xt)
    adapted_kept = adapt.adabn(copy.deepcopy(kept), xt)
    assert torch.allclose(adapted_kept[1].running_mean, adapted_plain[1].running_mean)
    assert robust.accuracy(adapted_kept, xt, yt) > 0.7
