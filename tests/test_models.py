import pytest
import torch
from torch import nn

from tlcourse import models

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def test_lite0_weights_are_the_real_imagenet_weights(lite0):
    assert models.count_parameters(lite0) == 4_652_008
    # Every tensor came from the package file, none left at timm's random initialisation.
    source = list(models._lite0_state_dict().values())
    for src, (_, dst) in zip(source, lite0.state_dict().items()):
        assert torch.equal(src, dst)


def test_pretrained_false_gives_different_weights(lite0):
    fresh = models.efficientnet_lite0(pretrained=False)
    assert not torch.equal(fresh.conv_stem.weight, lite0.conv_stem.weight)


def test_predictions_on_bundled_photos(lite0, bundled_photos):
    transform = models.preprocess(lite0)
    batch = torch.stack([transform(bundled_photos[n]) for n in ("chelsea", "coffee")])
    with torch.no_grad():
        top3 = lite0(batch).topk(3, dim=1).indices
    assert any(i in CAT_CLASSES for i in top3[0].tolist())
    assert top3[1, 0].item() == ESPRESSO
    names = models.predict_images(lite0, [bundled_photos["coffee"]], k=2)
    assert names[0][0][0] == "espresso" and 0.5 < names[0][0][1] <= 1.0


def test_corrupt_weights_file_is_detected(tmp_path, monkeypatch):
    bad = tmp_path / "lite0.pth"
    bad.write_bytes(b"not a state dict")
    monkeypatch.setattr(models, "lite0_weights_path", lambda: bad)
    models._lite0_state_dict.cache_clear()
    try:
        with pytest.raises(models.BackboneUnavailable, match="corrupt.*force-reinstall"):
            models.efficientnet_lite0()
    finally:
        models._lite0_state_dict.cache_clear()


def test_preprocess_matches_lite0_training_normalisation(bundled_photos):
    x = models.preprocess(image_size=160)(bundled_photos["chelsea"])
    assert x.shape == (3, 160, 160)
    assert -1.0 <= x.min() < -0.5 and 0.5 < x.max() <= 1.0  # mean = std = 0.5 maps [0, 1] to [-1, 1]
    assert models.normalization() == ((0.5,) * 3, (0.5,) * 3)


def test_split_backbone_head_reproduces_model(lite0):
    backbone, head = models.split_backbone_head(lite0)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        features = backbone(x)
        assert features.shape == (2, 1280)
        torch.testing.assert_close(head(features), lite0(x))
    assert isinstance(head, nn.Linear) and head.out_features == 1000
    assert models.num_features(backbone) == 1280
    # The backbone is a copy: freezing it leaves the original model trainable.
    for p in backbone.parameters():
        p.requires_grad = False
    assert models.count_parameters(lite0, trainable_only=True) == models.count_parameters(lite0)


def test_new_head_for_other_class_counts():
    model = models.create_model("efficientnet_lite0", num_classes=2)
    assert model.get_classifier().out_features == 2
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 2)


def test_torchvision_split_without_weights():
    model = models.create_model("resnet18", pretrained=False, num_classes=3)
    backbone, head = models.split_backbone_head(model)
    assert head.out_features == 3
    assert backbone.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 512)


def test_offline_download_gives_clear_message(monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(models.BackboneUnavailable, match="offline.*efficientnet_lite0"):
        models.create_model("resnet18")


def test_imagenet_classes():
    classes = models.imagenet_classes()
    assert len(classes) == 1000
    assert classes[281].startswith("tabby") and classes[ESPRESSO] == "espresso"


def test_topk_sorted_probabilities():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    out = models.topk(logits, k=2, classes=["a", "b", "c"])
    assert [name for name, _ in out[0]] == ["b", "c"]
    assert out[1][0][0] == "a" and out[0][0][1] > out[0][1][1]
    assert abs(sum(p for _, p in models.topk(logits, k=3, classes=["a", "b", "c"])[0]) - 1) < 1e-6


def test_size_on_disk_is_about_four_bytes_per_parameter():
    layer = nn.Linear(1000, 100)
    size = models.size_on_disk(layer)
    assert 4 * 100_100 <= size < 4 * 100_100 + 4096            # float32 weights plus a small header


def test_cpu_latency_is_measured_and_threads_restored():
    threads = torch.get_num_threads()
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    big = nn.Sequential(nn.Conv2d(3, 64, 7), nn.Conv2d(64, 64, 7), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    fast = models.cpu_latency_ms(small, 32, repeats=5, warmup=1, threads=1)
    slow = models.cpu_latency_ms(big, 32, repeats=5, warmup=1, threads=1)
    assert 0 < fast < slow
    assert torch.get_num_threads() == threads
