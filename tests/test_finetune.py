"""Fine-tuning helpers on timm's EfficientNet-Lite0 with random weights and 32 px inputs:
the real layer structure, fast and offline."""

import copy

import pytest
import timm
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from tlcourse import finetune as ft
from tlcourse import train


def _tiny(num_classes=3):
    # The course backbone's structure (7 stages, conv_head, bn2, classifier) without loading
    # weights; at 32 px a forward pass takes milliseconds.
    torch.manual_seed(0)
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_unfreeze_and_count():
    model = _tiny()
    total = sum(p.numel() for p in model.parameters())
    assert ft.trainable_parameters(model) == total
    ft.freeze(model)
    assert ft.trainable_parameters(model) == 0
    ft.unfreeze(model.classifier)
    assert ft.trainable_parameters(model) == model.classifier.weight.numel() + model.classifier.bias.numel()


def test_layer_groups_cover_every_parameter_once():
    model = _tiny()
    groups = ft.layer_groups(model)
    assert len(groups) == 1 + len(model.blocks) == 8
    assert groups[0][0] is model.classifier
    ids = [id(p) for g in groups for p in g.parameters()]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert any(m is model.conv_head for m in groups[1]) and any(m is model.conv_stem for m in groups[-1])


def test_layer_groups_of_a_resnet_and_an_unknown_model():
    import torchvision

    resnet = torchvision.models.resnet18(num_classes=2)
    assert [g[0] for g in ft.layer_groups(resnet)[:2]] == [resnet.fc, resnet.layer4]
    with pytest.raises(ValueError, match="layer groups"):
        ft.layer_groups(nn.Sequential(nn.Linear(2, 2)))


def test_unfreeze_last_blocks():
    model = _tiny()
    ft.unfreeze_last_blocks(model, 0)
    assert _trainable_names(model) == {"classifier.weight", "classifier.bias"}
    ft.unfreeze_last_blocks(model, 2)
    names = _trainable_names(model)
    assert any(n.startswith("blocks.6.") for n in names) and any(n.startswith("blocks.5.") for n in names)
    assert not any(n.startswith("blocks.4.") for n in names) and "conv_head.weight" in names
    assert "conv_stem.weight" not in names
    ft.unfreeze_last_blocks(model, None)
    assert ft.trainable_parameters(model) == sum(p.numel() for p in model.parameters())
    ft.unfreeze_last_blocks(model, 7)
    assert ft.trainable_parameters(model) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError):
        ft.unfreeze_last_blocks(model, -1)


def test_layerwise_param_groups_decay_and_trainable_only():
    model = _tiny()
    ft.unfreeze_last_blocks(model, 2)
    groups = ft.layerwise_param_groups(model, base_lr=1.0, decay=0.5)
    assert [g["lr"] for g in groups] == [1.0, 0.5, 0.25]
    assert [g["name"] for g in groups] == ["head", "group -1", "group -2"]
    assert sum(p.numel() for g in groups for p in g["params"]) == ft.trainable_parameters(model)
    everything = ft.layerwise_param_groups(model, 1.0, 0.5, trainable_only=False, weight_decay=0.0)
    assert len(everything) == 8 and everything[-1]["lr"] == 0.5 ** 7 and everything[0]["weight_decay"] == 0.0


def test_warmup_cosine_shape():
    lrs = ft.lr_curve(total_steps=100, warmup_steps=10, base_lr=2.0, start_factor=0.1)
    assert len(lrs) == 100
    assert lrs[0] == pytest.approx(0.2)                      # warm-up starts at start_factor * lr
    assert max(lrs) == pytest.approx(2.0) and lrs.index(max(lrs)) == 10
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11]))    # rises during warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))     # then only decays
    assert lrs[-1] < 0.01
    assert ft.lr_curve(10, 0)[0] == 1.0
    with pytest.raises(ValueError):
        ft.lr_curve(10, 10)


def test_warmup_cosine_keeps_layerwise_ratios():
    model = _tiny()
    opt = torch.optim.SGD(ft.layerwise_param_groups(model, 1.0, 0.5), lr=1.0)
    sched = ft.warmup_cosine(opt, 20, 5)
    for _ in range(7):
        opt.step()
        sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[1] == pytest.approx(lrs[0] / 2) and lrs[2] == pytest.approx(lrs[0] / 4)


def test_keep_batchnorm_eval_survives_train_and_deepcopy():
    model = _tiny()
    ft.keep_batchnorm_eval(model)
    model.train()
    bns = ft.batchnorm_layers(model)
    assert bns and not any(bn.training for bn in bns)
    assert model.training and model.classifier.training
    before = ft.batchnorm_state(model)
    model(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert ft.batchnorm_drift(before, model) == 0.0
    twin = copy.deepcopy(model).train()
    assert not any(bn.training for bn in ft.batchnorm_layers(twin))
    ft.release_batchnorm(model)
    model.train()
    assert all(bn.training for bn in bns)
    model(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert ft.batchnorm_drift(before, model) > 1e-3


def test_frozen_parameters_do_not_freeze_batchnorm_statistics():
    # The pitfall the chapter shows: requires_grad=False leaves the BN buffers moving.
    model = ft.freeze(_tiny()).train()
    before = ft.batchnorm_state(model)
    model(torch.randn(4, 3, 32, 32) + 2)
    assert ft.batchnorm_drift(before, model) > 1e-3
    ft.set_batchnorm_eval(model.train())
    after_eval = ft.batchnorm_state(model)
    model(torch.randn(4, 3, 32, 32) + 2)
    assert ft.batchnorm_drift(after_eval, model) == 0.0


def test_keep_batchnorm_eval_can_freeze_affine():
    model = ft.keep_batchnorm_eval(_tiny(), freeze_affine=True)
    assert all(not p.requires_grad for bn in ft.batchnorm_layers(model) for p in bn.parameters())
    assert model.classifier.weight.requires_grad


def test_gradual_unfreezing_one_group_per_epoch():
    model = _tiny()
    unfreezer = ft.GradualUnfreezing(model, steps_per_epoch=3)
    assert _trainable_names(model) == {"classifier.weight", "classifier.bias"}
    counts = [ft.trainable_parameters(model)]
    for _ in range(3 * 9):
        unfreezer.step()
        counts.append(ft.trainable_parameters(model))
    assert unfreezer.history == [0, 1, 2, 3, 4, 5, 6, 7, 7, 7]
    assert counts[2] == counts[0] < counts[3] < counts[6]
    assert counts[-1] == sum(p.numel() for p in model.parameters())


def test_gradual_unfreezing_in_fit_steps_inner_scheduler():
    torch.manual_seed(0)
    model = _tiny(2)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4))
    opt = torch.optim.AdamW(ft.layerwise_param_groups(model, 1e-3, trainable_only=False))
    frozen_stem = model.conv_stem.weight.detach().clone()
    sched = ft.GradualUnfreezing(model, steps_per_epoch=2, scheduler=ft.warmup_cosine(opt, 6, 1))
    hist = train.fit(model, train.make_loader(data, 4), None, opt, epochs=3, scheduler=sched, progress=False)
    assert sched.history[:3] == [0, 1, 2] and len(hist["lr"]) == 3
    assert torch.equal(model.conv_stem.weight, frozen_stem)  # never unfrozen: never moved
    assert opt.param_groups[0]["lr"] < 1e-4                  # the cosine ran to its end


def test_predecoded_decodes_once_and_transforms(tmp_path):
    paths = []
    for i, size in enumerate([(60, 40), (30, 90)]):
        p = tmp_path / f"{i}.jpg"
        Image.new("RGB", size, (200, 30 * i, 10)).save(p)
        paths.append(p)
    data = ft.PreDecoded.from_paths(paths, [0, 1], ["a", "b"], short_side=20)
    assert [min(x.shape[1:]) for x in data.images] == [20, 20]
    assert data.images[0].dtype == torch.uint8 and data.images[0].shape[0] == 3
    x, y = data.with_transform(ft.train_transform(16))[1]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1 and y == 1
    x, _ = data.with_transform(ft.eval_transform(16, mean=(0.0,) * 3, std=(1.0,) * 3))[0]
    assert x.shape == (3, 16, 16) and 0 <= x.min()
    assert ft.short_side_for(224) == 256
    with pytest.raises(ValueError):
        ft.PreDecoded(data.images, [0], ["a"])


def test_transplant_head_and_agreement():
    original = _tiny(num_classes=10).eval()
    finetuned = copy.deepcopy(original)
    finetuned.reset_classifier(2)
    x = torch.randn(6, 3, 32, 32)
    same = ft.transplant_head(finetuned, original)
    assert same.classifier.out_features == 10
    report = ft.imagenet_agreement(original, same, x)
    assert report["agreement"] == 1.0 and report["kl"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in finetuned.blocks.parameters():
            p.add_(torch.randn_like(p))
    changed = ft.imagenet_agreement(original, ft.transplant_head(finetuned, original), x)
    assert changed["kl"] > 0.01 and changed["p_changed"].shape == (6, 10)
    assert torch.equal(ft.transplant_head(finetuned, original).classifier.weight, original.classifier.weight)


def test_run_strategy_measures_and_tables():
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4))
    loader = train.make_loader(data, 4)
    result = ft.run_strategy(lambda: _tiny(2), ft.Strategy("head", blocks=0, epochs=2), loader, loader, progress=False)
    assert result.trainable == 2 * result.model.num_features + 2
    assert 0 <= result.val_acc <= 1 and result.seconds > 0 and result.bn_drift == 0.0
    gradual = ft.run_strategy(lambda: _tiny(2), ft.Strategy("g", gradual=True, epochs=2), loader, loader, progress=False)
    assert gradual.history["unfrozen_groups"] == [0, 1] and gradual.trainable > result.trainable
    assert "| head |" in ft.results_markdown([result, gradual])


def test_predecoded_from_dataset_lfw_fallback():
    from tlcourse import datasets

    train_set = ft.PreDecoded.from_dataset(datasets.lfw_faces("train"), short_side=40)
    val_set = ft.PreDecoded.from_dataset(datasets.lfw_faces("val"), short_side=40)
    assert len(train_set) == 100 and len(val_set) == 100
    assert train_set.classes == ["non-face", "face"] and train_set.labels.count(1) == 50
    x, _ = train_set.with_transform(ft.train_transform(32))[0]
    assert train_set.images[0].shape == (3, 40, 40) and train_set.images[0].dtype == torch.uint8
    assert x.shape == (3, 32, 32)
