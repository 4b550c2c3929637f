"""Chapter 02's fine-tuning recipe in Keras (``tlcourse.keras_finetune``) and the whole-photo views of
``keras_data.augmented_views``, against the PyTorch chapters' ``finetune`` and ``distill``.

Small images and one EfficientNet-Lite0 per test: well under a minute on two CPU cores.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("keras") is None:
    pytest.skip("TensorFlow and Keras 3 are not installed (pip install 'tlcourse[tensorflow]')",
                allow_module_level=True)

from PIL import Image  # noqa: E402

from tlcourse import finetune, models  # noqa: E402
from tlcourse import keras_data as kd  # noqa: E402 - imports TensorFlow through tlcourse._tf
from tlcourse import keras_finetune as kft  # noqa: E402
from tlcourse import keras_models as km  # noqa: E402
from tlcourse._tf import keras, tf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _size(weights) -> int:
    return sum(int(np.prod(w.shape)) for w in weights)


# --- layer groups and the schedule: equal to the PyTorch chapter's -------------------------------


def test_layer_groups_hold_the_parameters_of_the_pytorch_groups():
    model, base = km.classifier(2, seed=0)
    base.trainable = True
    groups = kft.layer_groups(base)
    torch_groups = finetune.layer_groups(models.efficientnet_lite0(pretrained=False, num_classes=2))
    assert len(groups) == len(torch_groups) - 1 == 7          # PyTorch's group 0 is the head
    keras_sizes = [_size(w for layer in g for w in layer.trainable_weights) for g in groups]
    torch_sizes = [sum(p.numel() for p in g.parameters()) for g in torch_groups[1:]]
    assert keras_sizes == torch_sizes
    assert _size(model.layers[-1].trainable_weights) == sum(p.numel() for p in torch_groups[0].parameters())
    names = [layer.name for g in groups for layer in g]
    assert len(names) == len(set(names))                      # no layer in two groups
    assert {layer.name for layer in base.layers if layer.weights} <= set(names)   # none left out
    assert {"blocks.6.0.conv_pw", "conv_head", "bn2"} <= {layer.name for layer in groups[0]}
    assert {"conv_stem", "bn1", "blocks.0.0.conv_dw"} <= {layer.name for layer in groups[-1]}


def test_layer_groups_refuse_another_network():
    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, name="mystery")])
    with pytest.raises(ValueError, match="mystery"):
        kft.layer_groups(other)


@pytest.mark.parametrize("total, warmup", [(64, 12), (40, 0), (10, 9)])
def test_warmup_cosine_equals_the_pytorch_schedule(total, warmup):
    schedule = kft.warmup_cosine(5e-4, total, warmup)
    keras_curve = [float(schedule(step)) for step in range(total)]
    np.testing.assert_allclose(keras_curve, finetune.lr_curve(total, warmup, base_lr=5e-4), rtol=1e-5, atol=1e-12)


def test_warmup_cosine_bad_arguments():
    with pytest.raises(ValueError, match="warmup_steps"):
        kft.warmup_cosine(1e-3, 10, 10)


# --- fine_tune: what trains, how fast, and what stays --------------------------------------------


def _batches(n=8, size=32, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (n, size, size, 3)).astype("float32")
    y = (np.arange(n) % 2).astype("int32")

    def batches(epoch):
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    return batches, n // batch


def _state(model):
    return {w.path: w.numpy().copy() for w in model.weights}


def test_fine_tune_moves_the_head_and_last_groups_at_their_learning_rates_and_nothing_else():
    model, base = km.classifier(2, seed=0)
    before = _state(model)
    batches, steps = _batches()
    lr, decay = 1e-3, 0.5
    out = kft.fine_tune(model, base, batches, epochs=1, steps_per_epoch=steps, blocks=2, lr=lr,
                        layer_decay=decay, warmup=0.5, weight_decay=0.0)
    assert len(out["losses"]) == 1 and out["seconds"] > 0 and not model.trainable
    after = _state(model)
    groups = kft.layer_groups(base)
    trained = {w.path for g in groups[:2] for layer in g for w in layer.weights}
    head = model.layers[-1]
    for w in model.weights:
        moved = float(np.abs(after[w.path] - before[w.path]).max())
        if "moving_" in w.path:                       # BatchNorm's ImageNet statistics stay
            assert moved == 0, w.path
        elif w.path in trained or any(w is v for v in head.weights):
            continue
        else:
            assert moved == 0, w.path                 # frozen groups stay
    # Adam's first steps move each weight by about its learning rate (the update m / sqrt(v) is
    # about ±1): the largest move per group shows each group's rate, halved group by group.
    def largest(weights):
        return max(float(np.abs(after[w.path] - before[w.path]).max()) for w in weights)
    head_move = largest(head.weights)
    group_moves = [largest([w for layer in g for w in layer.weights if "moving_" not in w.path]) for g in groups[:2]]
    assert head_move > 0 and all(m > 0 for m in group_moves)
    ratios = [head_move / group_moves[0], group_moves[0] / group_moves[1]]
    assert all(1.5 < r < 2.5 for r in ratios), ratios
    assert head_move < 2 * lr                          # the warm-up: rates still below the peak


def test_fine_tune_zero_blocks_is_the_head_alone():
    model, base = km.classifier(2, seed=1)
    before = _state(base)
    batches, steps = _batches(seed=1)
    kft.fine_tune(model, base, batches, epochs=1, steps_per_epoch=steps, blocks=0)
    assert all(np.array_equal(before[w.path], w.numpy()) for w in base.weights)


def test_fine_tune_refuses_a_wrong_step_count_and_a_bad_model():
    model, base = km.classifier(2, seed=0)
    batches, steps = _batches()
    with pytest.raises(ValueError, match="steps_per_epoch"):
        kft.fine_tune(model, base, batches, epochs=1, steps_per_epoch=steps + 1, blocks=0)
    with pytest.raises(ValueError, match="blocks"):
        kft.fine_tune(model, base, batches, epochs=1, steps_per_epoch=steps, blocks=9)
    plain = keras.Sequential([keras.Input((32, 32, 3)), base, keras.layers.Dense(2), keras.layers.Softmax()])
    with pytest.raises(ValueError, match="Dropout -> Dense"):
        kft.fine_tune(plain, base, batches, epochs=1, steps_per_epoch=steps)


# --- whole-photo views ---------------------------------------------------------------------------


def _stripes(tmp_path):
    thirds = np.zeros((64, 192, 3), np.uint8)      # red | green | blue, 64 px each
    thirds[:, :64, 0] = thirds[:, 64:128, 1] = thirds[:, 128:, 2] = 255
    for name, image in (("stripes", thirds), ("zplain", np.full((40, 40, 3), 128, np.uint8))):
        (tmp_path / name).mkdir()
        Image.fromarray(image).save(tmp_path / name / "image.png")
    return kd.decode_images(tmp_path, side=32, progress=False)   # the stripes are image 0


def test_decoded_keeps_the_whole_photo_and_its_centre_square(tmp_path):
    decoded = _stripes(tmp_path)
    photo = decoded.photos[0]
    assert photo.shape == (32, 96, 3) and photo.dtype == np.uint8
    np.testing.assert_array_equal(decoded.images[0], photo[:, 32:64])


def test_whole_photo_views_reach_the_sides_that_the_centre_square_loses(tmp_path):
    decoded = _stripes(tmp_path)
    whole, labels = kd.augmented_views(decoded, 40, 16, seed=3)
    square, _ = kd.augmented_views(decoded, 40, 16, seed=3, whole_photo=False)
    assert whole.shape == square.shape == (80, 16, 16, 3) and labels.tolist() == [0, 1] * 40
    whole, square = whole[::2], square[::2]           # the stripes' views (view v of image i at 2v + i)

    def red_or_blue(views):       # share of views with a clearly red or blue pixel
        return float(((views[..., 0] > 200) | (views[..., 2] > 200)).any(axis=(1, 2)).mean())
    assert red_or_blue(square) == 0                   # the centre third is green
    assert red_or_blue(whole) > 0.5
    again, _ = kd.augmented_views(decoded, 40, 16, seed=3)
    np.testing.assert_array_equal(whole, again[::2])  # fixed by the seed


def test_whole_photo_views_need_the_photos():
    images = np.zeros((2, 20, 20, 3), np.uint8)
    decoded = kd.Decoded(images, np.zeros(2, np.int32), ["a"])
    with pytest.raises(ValueError, match="whole_photo=False"):
        kd.augmented_views(decoded, 1, 8)
    assert kd.augmented_views(decoded, 1, 8, whole_photo=False)[0].shape == (2, 8, 8, 3)
