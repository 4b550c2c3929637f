"""LoRA through peft and BitFit on timm's EfficientNet-Lite0 (the course backbone's structure)."""

import copy

import pytest
import timm
import torch

from tlcourse import efficient, finetune


@pytest.fixture(scope="module")
def lite0():
    # Random weights: the structure is what matters here, and no download is needed.
    torch.manual_seed(0)
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3).eval()


def _x(n=2, size=64):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _randomise_lora_b(model):
    # B starts at zero (the adapter is a no-op); give it values, as training would.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


def test_pointwise_and_depthwise_layers_are_told_apart(lite0):
    pointwise, depthwise = efficient.pointwise_convs(lite0), efficient.depthwise_convs(lite0)
    assert len(pointwise) == 32 and len(depthwise) == 16
    assert "conv_head" in pointwise and not set(pointwise) & set(depthwise)
    modules = dict(lite0.named_modules())
    assert all(modules[n].groups == modules[n].in_channels > 1 for n in depthwise)
    weights = sum(p.numel() for p in lite0.parameters())
    assert sum(modules[n].weight.numel() for n in pointwise) / weights > 0.9


def test_lora_starts_as_the_frozen_model_and_trains_a_sliver(lite0):
    base = copy.deepcopy(lite0)
    x = _x()
    with torch.no_grad():
        before = base(x)
    model = efficient.add_lora(base, rank=2)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)  # B = 0: exactly the pretrained network
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    # r * (in + out) per pointwise conv
    modules = dict(lite0.named_modules())
    expected = sum(2 * (modules[n].in_channels + modules[n].out_channels) for n in efficient.pointwise_convs(lite0))
    assert efficient.lora_parameters(model) == expected
    total = sum(p.numel() for p in lite0.parameters())
    assert finetune.trainable_parameters(model) < 0.02 * total  # rank 2: under 2 % of full fine-tuning


def test_lora_scaling_is_alpha_over_rank(lite0):
    model = efficient.add_lora(copy.deepcopy(lite0), rank=4, alpha=8, targets=["conv_head"])
    layer = model.base_model.model.conv_head
    assert layer.scaling["default"] == pytest.approx(8 / 4)


def test_depthwise_convolutions_are_refused_at_a_low_rank(lite0):
    name = efficient.depthwise_convs(lite0)[3]
    with pytest.raises(ValueError, match="groups"):
        efficient.add_lora(copy.deepcopy(lite0), rank=8, targets=[name])


def test_merge_gives_the_same_outputs_and_the_plain_architecture(lite0):
    model = efficient.add_lora(copy.deepcopy(lite0), rank=4)
    _randomise_lora_b(model)
    model.eval()
    x = _x()
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, lite0(x), atol=1e-3)  # the adapter changes the outputs
        merged = efficient.merge_lora(model).eval()
        assert type(merged) is type(lite0)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merged(x), adapted, atol=1e-4)


def test_adapter_file_is_small_and_loads_back(lite0, tmp_path):
    model = efficient.add_lora(copy.deepcopy(lite0), rank=4)
    _randomise_lora_b(model)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].bias.fill_(0.3)  # a trained head
    model.eval()
    nbytes = efficient.save_adapter(model, tmp_path / "adapter")
    assert set(efficient.ADAPTER_FILES) <= {p.name for p in (tmp_path / "adapter").iterdir()}
    from tlcourse.models import size_on_disk

    assert nbytes * 20 < size_on_disk(lite0)
    loaded = efficient.load_adapter(copy.deepcopy(lite0), tmp_path / "adapter").eval()
    x = _x()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)  # the head came back too
    with pytest.raises(FileNotFoundError, match="holds no LoRA adapter"):
        efficient.load_adapter(copy.deepcopy(lite0), tmp_path)


def test_bitfit_trains_norms_biases_and_head_only(lite0):
    model = efficient.select_bitfit(copy.deepcopy(lite0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    bn_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for name in trainable:
        owner = name.rsplit(".", 1)[0]
        assert owner in bn_names or name.endswith("bias") or name.startswith("classifier."), name
    assert {"classifier.weight", "classifier.bias", "bn2.weight", "bn2.bias"} <= trainable
    assert not any(n.endswith("conv_pw.weight") or n.endswith("conv_dw.weight") for n in trainable)
    share = finetune.trainable_parameters(model) / sum(p.numel() for p in model.parameters())
    assert 0.005 < share < 0.02, share
    state = efficient.trainable_state(model)
    assert set(state) == trainable


def test_head_name_is_found_or_refused():
    import torchvision

    assert efficient.head_name(torchvision.models.resnet18(weights=None)) == "fc"
    with pytest.raises(ValueError, match="cannot find the classifier"):
        efficient.head_name(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="rank"):
        efficient.add_lora(torch.nn.Linear(2, 2), rank=0)
