"""ImageNet-C-style corruptions: deterministic by seed, harsher with severity, faithful formulas."""

import numpy as np
import pytest
import torch

from tlcourse import shift


def _images(n=3, size=48, seed=0):
    # Smooth images (a colour gradient plus noise), so blur and JPEG have structure to destroy.
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    base = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                        0.5 * torch.ones(size, size)])
    x = base[None] * 0.7 + 0.3 * torch.rand((n, 3, size, size), generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _distance(a, b):
    return (a.float() - b.float()).abs().mean().item()


@pytest.mark.parametrize("name", list(shift.CORRUPTIONS))
def test_every_corruption_keeps_shape_and_dtype_and_grows_with_severity(name):
    x = _images()
    distances = []
    for severity in shift.SEVERITIES:
        y = shift.corrupt(x, name, severity, seed=0)
        assert y.shape == x.shape and y.dtype == torch.uint8
        distances.append(_distance(x, y))
    assert distances[0] > 0.5, (name, distances)  # severity 1 already changes the pixels
    # JPEG's quantisation is not strictly monotone pixel by pixel; the trend must hold.
    assert distances[-1] > distances[0], (name, distances)
    if name != "jpeg":
        assert distances == sorted(distances), (name, distances)


def test_single_image_and_batch_agree():
    x = _images(n=1)
    for name in shift.CORRUPTIONS:
        assert torch.equal(shift.corrupt(x[0], name, 3), shift.corrupt(x, name, 3)[0]), name


def test_deterministic_by_seed():
    x = _images()
    a = shift.corrupt(x, "gaussian_noise", 2, seed=5)
    assert torch.equal(a, shift.corrupt(x, "gaussian_noise", 2, seed=5))
    assert not torch.equal(a, shift.corrupt(x, "gaussian_noise", 2, seed=6))
    # the global generator plays no part
    torch.manual_seed(123)
    assert torch.equal(a, shift.corrupt(x, "gaussian_noise", 2, seed=5))


def test_noise_has_the_imagenet_c_standard_deviation():
    grey = torch.full((1, 3, 128, 128), 128, dtype=torch.uint8)  # far from 0 and 255: no clipping
    y = shift.corrupt(grey, "gaussian_noise", 1, seed=0).float() / 255
    assert y.std().item() == pytest.approx(0.08, abs=0.004)


def test_contrast_pulls_towards_the_mean_and_brightness_matches_hsv():
    from skimage import color

    x = _images(n=1)
    y = shift.corrupt(x, "contrast", 5)  # c = 0.05: almost flat
    assert y.float().std() < 0.1 * x.float().std()
    assert abs(y.float().mean() - x.float().mean()) < 1.0
    img = x[0].permute(1, 2, 0).numpy() / 255
    hsv = color.rgb2hsv(img)
    hsv[..., 2] = np.clip(hsv[..., 2] + 0.3, 0, 1)  # severity 3
    expected = np.round(color.hsv2rgb(hsv) * 255)
    got = shift.corrupt(x, "brightness", 3)[0].permute(1, 2, 0).numpy()
    assert np.abs(expected - got).max() <= 1


def test_suite_seeds_do_not_depend_on_which_corruptions_run():
    x = _images()
    all_of_them = {(n, s): y for n, s, y in shift.corruption_suite(x, severities=(2,), seed=1)}
    alone = dict(((n, s), y) for n, s, y in shift.corruption_suite(x, severities=(2,), names=["gaussian_noise"], seed=1))
    assert len(all_of_them) == len(shift.CORRUPTIONS)
    assert torch.equal(all_of_them[("gaussian_noise", 2)], alone[("gaussian_noise", 2)])


def test_bad_input_is_refused_clearly():
    x = _images()
    with pytest.raises(ValueError, match="unknown corruption 'fog'.*gaussian_noise"):
        shift.corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="severity must be one of"):
        shift.corrupt(x, "jpeg", 6)
    with pytest.raises(TypeError, match="uint8"):
        shift.corrupt(x.float() / 255, "jpeg", 1)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        shift.corrupt(x[:, :1], "contrast", 1)
    with pytest.raises(ValueError, match="unknown corruption"):
        list(shift.corruption_suite(x, names=["snow"]))
