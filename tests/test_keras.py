"""The Keras companions: import safety, the ported EfficientNet-Lite0, tf.data pipelines, distillation.

Each Keras EfficientNet is built once per module (fixtures), and images are small except for the
224 px parity check, so the whole file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("keras") is None:
    pytest.skip("TensorFlow and Keras 3 are not installed (pip install 'tlcourse[tensorflow]')",
                allow_module_level=True)

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tlcourse import datasets, distill, models  # noqa: E402
from tlcourse import keras_data as kd  # noqa: E402 - imports TensorFlow through tlcourse._tf
from tlcourse import keras_distill as kdist  # noqa: E402
from tlcourse import keras_models as km  # noqa: E402
from tlcourse._tf import keras, tf  # noqa: E402

ESPRESSO = 967

# Keras 3.15's convert_to_numpy calls np.array(tensor, copy=False) on TensorFlow tensors (noise only).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _np(x) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=env if env is not None else dict(os.environ))


# --- 1, 2: importing ---------------------------------------------------------------------------


def test_pytorch_chapters_never_import_tensorflow():
    # Every tlcourse module except the Keras ones (found by walking the package, so a new module
    # is covered without editing this list).
    result = _run("""
        import pkgutil, importlib, sys
        import tlcourse
        names = [m.name for m in pkgutil.walk_packages(tlcourse.__path__, "tlcourse.")
                 if not m.name.startswith(("tlcourse.keras_", "tlcourse._tf"))]
        for name in names:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras"))
        print("IMPORTED", len(names), "LOADED", loaded)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED []" in result.stdout, result.stdout
    assert int(result.stdout.split("IMPORTED")[1].split()[0]) >= 20, result.stdout


def test_importing_keras_side_first_is_safe():
    # TensorFlow first and then torchvision dies with SIGSEGV (rc -11) in this environment;
    # tlcourse._tf loads torch._dynamo (Triton) before TensorFlow to prevent it.
    env = dict(os.environ)
    env.pop("KERAS_BACKEND", None)  # the default backend must be TensorFlow
    result = _run("""
        import sys
        import tlcourse.keras_data
        assert "tensorflow" in sys.modules and "torch._dynamo" in sys.modules
        import tlcourse.models
        import torchvision.ops
        import tlcourse.keras_models, tlcourse.keras_distill
        import keras
        print("BACKEND", keras.backend.backend())
    """, env)
    assert result.returncode == 0, f"rc {result.returncode}: {result.stderr[-3000:]}"
    assert "BACKEND tensorflow" in result.stdout


# --- 3: the port is exact ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def k_classifier():
    return km.efficientnet_lite0()  # ImageNet weights through the default path (models.efficientnet_lite0)


@pytest.fixture(scope="module")
def k_pooled():
    return km.efficientnet_lite0(include_top=False)  # pooling="avg"


@pytest.fixture(scope="module")
def k_fmap():
    return km.efficientnet_lite0(include_top=False, pooling=None)


@pytest.fixture(scope="module")
def photo_batch(lite0):
    photos = datasets.photos()
    assert len(photos) == 7
    transform = models.preprocess(lite0)
    return torch.stack([transform(img) for img in photos.values()]), list(photos)


def _torch(model, x):
    with torch.no_grad():
        return model.eval()(x).numpy()


def _assert_same_top5(a, b):
    top_a = np.argsort(-a, axis=1)[:, :5]
    top_b = np.argsort(-b, axis=1)[:, :5]
    np.testing.assert_array_equal(top_a, top_b)


def test_channels_last_and_pixel_conversion():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    y = km.to_channels_last(x)
    assert isinstance(y, np.ndarray) and y.shape == (2, 4, 5, 3) and y.flags["C_CONTIGUOUS"]
    assert y[1, 2, 3, 0] == x[1, 0, 2, 3] and y[0, 3, 4, 2] == x[0, 2, 3, 4]
    np.testing.assert_array_equal(km.to_channels_last(x.numpy()), y)
    pixels = km.normalized_to_pixels(torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 3, 1, 1))
    np.testing.assert_allclose(pixels.ravel(), [0.0, 127.5, 255.0])


def test_logits_match_pytorch_on_the_bundled_photos(lite0, k_classifier, photo_batch):
    x, names = photo_batch
    assert x.shape == (7, 3, 224, 224)
    expected = _torch(lite0, x)
    got = _np(k_classifier(km.normalized_to_pixels(x), training=False))
    assert got.shape == (7, 1000)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    _assert_same_top5(got, expected)
    # topk names the ImageNet classes, as models.topk does for PyTorch
    best = km.topk(got[names.index("coffee")][None], k=1)[0][0]
    assert best[0] == "espresso" and np.argmax(got[names.index("coffee")]) == ESPRESSO


@pytest.mark.parametrize("h, w", [(161, 161), (97, 130)])
def test_logits_match_pytorch_at_odd_sizes(lite0, k_classifier, photo_batch, h, w):
    # Odd and non-square sizes change where TF "same" padding puts the extra row/column in each
    # stride-2 layer (and catch a height/width mix-up).
    x = photo_batch[0][..., :h, :w].contiguous()
    expected = _torch(lite0, x)
    got = _np(k_classifier(km.normalized_to_pixels(x), training=False))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    _assert_same_top5(got, expected)


def test_backbone_matches_pytorch_backbone(lite0, k_pooled, k_fmap, photo_batch):
    backbone, _ = models.split_backbone_head(lite0)
    assert "classifier" not in [layer.name for layer in k_pooled.layers]  # ported without the head
    for x in (photo_batch[0], photo_batch[0][..., :97, :130].contiguous()):
        pixels = km.normalized_to_pixels(x)
        expected = _torch(backbone, x)
        got = _np(k_pooled(pixels, training=False))
        assert got.shape == (7, 1280)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
        # pooling=None: the last feature map [N, ceil(H/32), ceil(W/32), 1280], equal to timm's
        fmap = _np(k_fmap(pixels, training=False))
        h, w = x.shape[-2:]
        assert fmap.shape == (7, math.ceil(h / 32), math.ceil(w / 32), 1280)
        with torch.no_grad():
            expected_fmap = km.to_channels_last(lite0.forward_features(x))
        np.testing.assert_allclose(fmap, expected_fmap, rtol=0, atol=1e-4)
    assert _np(k_fmap(np.zeros((1, 224, 224, 3), np.float32))).shape == (1, 7, 7, 1280)


def test_batchnorm_statistics_are_the_pytorch_ones(lite0, k_pooled):
    bns = km.batchnorm_layers(k_pooled)
    torch_bns = [m for m in lite0.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == len(torch_bns) == 49
    expected = np.concatenate([t.numpy().ravel() for m in torch_bns for t in (m.running_mean, m.running_var)])
    np.testing.assert_array_equal(km.batchnorm_moving_stats(k_pooled), expected)
    # Nested models are searched too (in another order: Keras flattens nested models depth-first
    # from the end, so compare layer by layer, by name).
    outer = keras.Sequential([keras.Input((None, None, 3)), k_pooled, keras.layers.Dense(2)])
    nested = {layer.name: layer for layer in km.batchnorm_layers(outer)}
    assert sorted(nested) == sorted(layer.name for layer in bns)
    for layer in bns:
        assert nested[layer.name] is layer
    np.testing.assert_array_equal(np.sort(km.batchnorm_moving_stats(outer)), np.sort(expected))


# --- 4: porting errors ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blank_lite0():
    return km.efficientnet_lite0(weights=None)


def test_port_rejects_a_tensor_of_the_wrong_shape(lite0, blank_lite0):
    state = dict(lite0.state_dict())
    state["blocks.3.1.conv_pwl.weight"] = torch.zeros(80, 479, 1, 1)
    with pytest.raises(ValueError, match=r"Shape mismatch at blocks\.3\.1\.conv_pwl"):
        km.port_lite0_weights(blank_lite0, state)


def test_port_rejects_missing_and_extra_modules(lite0, blank_lite0):
    state = {k: v for k, v in lite0.state_dict().items() if not k.startswith("blocks.6.0.bn3.")}
    with pytest.raises(ValueError, match=r"Keras layers without PyTorch weights \['blocks\.6\.0\.bn3'\]"):
        km.port_lite0_weights(blank_lite0, state)
    state = dict(lite0.state_dict(), **{"extra_head.weight": torch.zeros(2, 1280)})
    with pytest.raises(ValueError, match=r"PyTorch modules without a Keras layer \['extra_head'\]"):
        km.port_lite0_weights(blank_lite0, state)


def test_ported_kernel_layouts(lite0, k_pooled):
    model = k_pooled
    stem = _np(model.get_layer("conv_stem").kernel)
    np.testing.assert_array_equal(stem, lite0.conv_stem.weight.detach().numpy().transpose(2, 3, 1, 0))
    dw = _np(model.get_layer("blocks.1.0.conv_dw").kernel)
    np.testing.assert_array_equal(dw, lite0.blocks[1][0].conv_dw.weight.detach().numpy().transpose(2, 3, 0, 1))
    assert model.get_layer("bn2").epsilon == pytest.approx(1e-3) == lite0.bn2.eps


def test_bad_arguments():
    with pytest.raises(ValueError, match="weights"):
        km.efficientnet_lite0(weights="bad")
    with pytest.raises(ValueError, match="1000 classes"):
        km.efficientnet_lite0(classes=10)
    with pytest.raises(ValueError, match="pooling"):
        km.efficientnet_lite0(include_top=False, weights=None, pooling="max")


# --- 5: freezing a Keras backbone ---------------------------------------------------------------


def test_frozen_backbone_runs_batchnorm_in_inference_mode(lite0):
    backbone = km.efficientnet_lite0(include_top=False, weights=None)
    km.port_lite0_weights(backbone, lite0.state_dict())
    x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    before = km.batchnorm_moving_stats(backbone)

    backbone.trainable = False
    assert backbone.trainable_weights == [] and len(backbone.non_trainable_weights) == len(backbone.weights)
    inference = _np(backbone(x, training=False))
    frozen_train = _np(backbone(x, training=True))
    np.testing.assert_allclose(frozen_train, inference, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(km.batchnorm_moving_stats(backbone), before)

    backbone.trainable = True
    assert len(backbone.trainable_weights) == 49 + 2 * 49  # 49 conv kernels, 49 BN gammas and betas
    train = _np(backbone(x, training=True))  # batch statistics, and one moving-average update
    assert np.abs(train - inference).max() > 0.1
    moved = km.batchnorm_moving_stats(backbone)
    assert np.abs(moved - before).max() > 1e-3


# --- 6: keras_data ------------------------------------------------------------------------------


def test_side_for():
    assert kd.side_for(224) == 256 and kd.side_for(160) == 182 and kd.side_for(64) == 73  # timm: floor(S / 0.875)


def _pil_square(path, side):
    """The same geometry with PIL: short side to `side` (bicubic), centre crop."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = side / min(w, h)
    size = (max(side, round(w * scale)), max(side, round(h * scale)))
    img = img.resize(size, Image.BICUBIC)
    left, top = (size[0] - side) // 2, (size[1] - side) // 2
    return np.asarray(img.crop((left, top, left + side, top + side)), dtype=np.float32)


def test_decode_hymenoptera_val():
    try:
        ds = datasets.hymenoptera("val")
    except datasets.DatasetUnavailable as exc:
        pytest.skip(f"hymenoptera is not available: {exc}")
    decoded = kd.decode_images(ds, side=64, progress=False)
    assert decoded.images.shape == (153, 64, 64, 3) and decoded.images.dtype == np.uint8
    assert decoded.labels.dtype == np.int32 and decoded.labels.tolist() == list(ds.targets)
    assert decoded.classes == ["ants", "bees"] and len(decoded) == 153
    # Each image is the centre square of its own photo: PIL's decoder and resampler differ from
    # TensorFlow's by < 1 level on average (measured 0.74-0.96); a squashed resize of the whole
    # photo differs by 23-34 levels, another photo by 75-91.
    for i in (0, 80, 152):
        ref = _pil_square(ds.samples[i][0], 64)
        assert np.abs(decoded.images[i] - ref).mean() < 4
        assert np.abs(decoded.images[i] - _pil_square(ds.samples[i + 1 if i < 152 else 0][0], 64)).mean() > 15


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_decode_folder_path_centre_crops_without_stretching(tmp_path):
    thirds = np.zeros((64, 192, 3), np.uint8)  # red | green | blue, 64 px each
    thirds[:, :64, 0] = thirds[:, 64:128, 1] = thirds[:, 128:, 2] = 255
    _write(tmp_path / "stripes" / "rgb.png", thirds)
    _write(tmp_path / "plain" / "a.png", np.full((40, 60, 3), (10, 20, 30), np.uint8))
    _write(tmp_path / "plain" / "b.png", np.full((50, 50, 3), 200, np.uint8))
    for source in (tmp_path, str(tmp_path)):
        decoded = kd.decode_images(source, side=32, progress=False)
        assert decoded.classes == ["plain", "stripes"] and decoded.labels.tolist() == [0, 0, 1]
        assert decoded.images.shape == (3, 32, 32, 3) and decoded.images.dtype == np.uint8
        assert (decoded.images[0] == (10, 20, 30)).all() and (decoded.images[1] == 200).all()
        stripes = decoded.images[2].astype(int)
        # the centre third only: green, no red or blue except where the resampling kernel reaches
        assert (stripes[:, 3:-3] == (0, 255, 0)).all()
        assert stripes[..., 0].mean() < 10 and stripes[..., 2].mean() < 10


def test_decode_array_dataset_grey_to_rgb():
    faces = datasets.lfw_faces("train")
    same = kd.decode_images(faces, side=25, progress=False)  # 25 px: no resize, exact pixels
    assert same.images.shape == (100, 25, 25, 3)
    np.testing.assert_array_equal(same.images, np.repeat(np.uint8(np.clip(faces.images, 0, 1) * 255)[..., None], 3, -1))
    assert same.labels.tolist() == faces.targets and same.classes == ["non-face", "face"]
    bigger = kd.decode_images(faces, side=32, progress=False)
    assert bigger.images.shape == (100, 32, 32, 3) and bigger.images.dtype == np.uint8
    assert (bigger.images[..., 0] == bigger.images[..., 2]).all()
    with pytest.raises(TypeError, match="Cannot decode"):
        kd.decode_images([1, 2, 3], side=32)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_unreadable_image_is_named(tmp_path, kind):
    _write(tmp_path / "good" / "ok.png", np.zeros((20, 20, 3), np.uint8))
    bad = tmp_path / "bad" / "broken.jpg"
    bad.parent.mkdir()
    if kind == "garbage":
        bad.write_bytes(b"this is not a JPEG at all" * 10)
    else:
        buffer = io.BytesIO()
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
        bad.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(kd.UnreadableImage, match=re.escape(str(bad))) as info:
        kd.decode_images(tmp_path, side=16, progress=False)
    assert isinstance(info.value, ValueError)


def _random_decoded(n=12, side=40, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    return kd.Decoded(images, np.arange(n, dtype=np.int32), [str(i) for i in range(n)])  # label = index


def _epoch(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def test_eval_pipeline_is_the_exact_centre_crop():
    decoded = _random_decoded()
    ds = kd.pipeline(decoded, 32, batch_size=5)
    sizes = [len(y) for _, y in ds]
    assert sizes == [5, 5, 2]
    x, y = _epoch(ds)
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert y.tolist() == list(range(12))  # in order
    np.testing.assert_array_equal(x, decoded.images[:, 4:36, 4:36].astype(np.float32))
    with pytest.raises(ValueError, match="larger than the decoded images"):
        kd.pipeline(decoded, 41)
    with pytest.raises(ValueError, match="larger"):
        kd.pipeline(decoded, 41, train=True)


def _locate(crop, source):
    """(dy, dx, flipped) of `crop` inside `source`, or None."""
    s = crop.shape[0]
    for flipped, view in ((False, crop), (True, crop[:, ::-1])):
        for dy in range(source.shape[0] - s + 1):
            for dx in range(source.shape[1] - s + 1):
                if np.array_equal(source[dy:dy + s, dx:dx + s], view):
                    return dy, dx, flipped
    return None


def test_train_pipeline_is_seeded_random_crops_and_flips():
    decoded = _random_decoded()
    a, b = kd.pipeline(decoded, 32, batch_size=5, train=True, seed=3), kd.pipeline(decoded, 32, batch_size=5, train=True, seed=3)
    a1, a2 = _epoch(a), _epoch(a)
    b1, b2 = _epoch(b), _epoch(b)
    for (xa, ya), (xb, yb) in ((a1, b1), (a2, b2)):  # same seed: the same batches, epoch for epoch
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a1[0], a2[0])  # a new epoch draws new crops (and a new order)
    other = _epoch(kd.pipeline(decoded, 32, batch_size=5, train=True, seed=4))
    assert not np.array_equal(other[0], a1[0])
    placements = []
    for x, y in (a1, a2):
        assert x.dtype == np.float32 and x.shape == (12, 32, 32, 3)
        assert sorted(y.tolist()) == list(range(12))  # every image once per epoch
        for crop, label in zip(x, y):
            where = _locate(crop.astype(np.uint8), decoded.images[label])
            assert where is not None, "a training crop is not a (flipped) window of its image"
            placements.append(where)
    assert {f for _, _, f in placements} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in placements}) > 5
    assert (a1[0] == a1[0].astype(np.uint8)).all()  # pixels are untouched bytes


# --- 7: keras_distill ---------------------------------------------------------------------------


def _logits(seed, b=16, c=10, scale=3.0):
    return (np.random.default_rng(seed).normal(size=(b, c)) * scale).astype(np.float32)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 8.0])
def test_distillation_loss_equals_pytorch_kd_loss(T):
    teacher, student = _logits(0), _logits(1, scale=1.0)
    expected = distill.kd_loss(torch.from_numpy(student), torch.from_numpy(teacher), None, T).item()
    got = float(kdist.distillation_loss(teacher_logits=tf.constant(teacher), student_logits=tf.constant(student), temperature=T))
    assert got == pytest.approx(expected, abs=1e-5, rel=1e-5)
    swapped = float(kdist.distillation_loss(teacher_logits=tf.constant(student), student_logits=tf.constant(teacher), temperature=T))
    assert abs(swapped - got) > 0.1  # KL is not symmetric: the order matters (measured >= 0.2)
    assert float(kdist.distillation_loss(teacher_logits=tf.constant(teacher), student_logits=tf.constant(teacher), temperature=T)) == pytest.approx(0, abs=1e-6)


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _grads(teacher, student, T, plain=False):
    t, s = tf.Variable(teacher), tf.Variable(student)
    with tf.GradientTape() as tape:
        loss = kdist.distillation_loss(teacher_logits=t, student_logits=s, temperature=T)
        if plain:
            loss = loss / (T * T)
    return tape.gradient(loss, [t, s])


def test_distillation_loss_gradients_and_the_t_squared_factor():
    teacher, student = _logits(2, b=32, scale=1.0), _logits(3, b=32, scale=1.0)
    g_teacher, g_student = _grads(teacher, student, 4.0)
    assert g_teacher is None or not np.any(_np(g_teacher))  # the teacher's logits are a constant
    # d/ds T² KL(softmax(t/T) || softmax(s/T)) = T (softmax(s/T) - softmax(t/T)) / B
    for T in (2.0, 16.0):
        analytic = T * (_softmax(student.astype(np.float64) / T) - _softmax(teacher.astype(np.float64) / T)) / 32
        np.testing.assert_allclose(_np(_grads(teacher, student, T)[1]), analytic, rtol=1e-4, atol=1e-7)
    norm = {T: np.linalg.norm(_np(_grads(teacher, student, T)[1])) for T in (2.0, 16.0)}
    plain = {T: np.linalg.norm(_np(_grads(teacher, student, T, plain=True)[1])) for T in (2.0, 16.0)}
    # With T² the gradient tends to (s - t, centred) / (C·B) as T grows: at unit-scale logits the
    # norms at T = 2 and 16 are within a few percent (measured ratio 1.02). Without T² the same
    # gradient is divided by T², so the ratio is 64x larger (measured 65.5): the soft term fades.
    assert 0.5 < norm[2.0] / norm[16.0] < 2.0
    assert plain[2.0] / plain[16.0] > 20


def test_distillation_loss_bad_input():
    with pytest.raises(ValueError, match="shape"):
        kdist.distillation_loss(teacher_logits=tf.zeros((2, 3)), student_logits=tf.zeros((2, 4)))
    for T in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            kdist.distillation_loss(teacher_logits=tf.zeros((2, 3)), student_logits=tf.zeros((2, 3)), temperature=T)


def _toy(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > x[..., 1].mean(axis=(1, 2))).astype(np.int32)
    return x, y


def _teacher():
    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(32),
                             keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Dropout(0.5),
                             keras.layers.Dense(2)], name="teacher")


def _student():
    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)], name="student")


def _values(model):
    return [_np(w).copy() for w in model.weights]


def test_distiller_trains_the_student_and_leaves_the_teacher_alone():
    keras.utils.set_random_seed(0)
    x, y = _toy()
    teacher, student = _teacher(), _student()
    assert teacher.count_params() > student.count_params()
    t0, s0 = _values(teacher), _values(student)
    distiller = kdist.Distiller(student, teacher, temperature=4.0, alpha=0.5)
    assert teacher.trainable is False
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = distiller.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    assert set(history) == {"loss", "soft_loss", "accuracy"}
    for before, after in zip(t0, _values(teacher)):  # weights and BatchNorm statistics
        np.testing.assert_array_equal(before, after)
    assert all(not np.array_equal(a, b) for a, b in zip(s0, _values(student)))
    # evaluate runs the student: its cross-entropy and accuracy over the data (equal-size batches)
    result = distiller.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    assert set(result) == {"loss", "accuracy"}
    logits = _np(student(x, training=False))
    ce = -np.mean(np.log(_softmax(logits.astype(np.float64))[np.arange(len(y)), y]))
    assert result["loss"] == pytest.approx(ce, rel=1e-4)
    assert result["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == y))


def test_distiller_with_precomputed_logits():
    keras.utils.set_random_seed(1)
    x, y = _toy()
    teacher_logits = _np(_teacher()(x, training=False))
    student = _student()
    s0 = _values(student)
    distiller = kdist.Distiller(student, None, temperature=2.0, alpha=0.7)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    data = tf.data.Dataset.from_tensor_slices(((x, teacher_logits), y)).batch(16)
    history = distiller.fit(data, epochs=2, shuffle=False, verbose=0).history
    assert set(history) == {"loss", "soft_loss", "accuracy"}
    assert all(not np.array_equal(a, b) for a, b in zip(s0, _values(student)))
    assert set(distiller.evaluate(data, verbose=0, return_dict=True)) == {"loss", "accuracy"}
    with pytest.raises(ValueError, match="teacher=None"):
        distiller.fit(x, y, batch_size=16, epochs=1, verbose=0)


def test_distiller_without_labels_fits_the_teacher():
    keras.utils.set_random_seed(2)
    x, _ = _toy()
    teacher_logits = _np(_teacher()(x, training=False)) * 3
    distiller = kdist.Distiller(_student(), None, temperature=2.0, alpha=0.9)
    distiller.compile(optimizer=keras.optimizers.Adam(3e-2))
    data = tf.data.Dataset.from_tensor_slices(((x, teacher_logits),)).batch(16)
    history = distiller.fit(data, epochs=5, shuffle=False, verbose=0).history
    assert set(history) == {"loss", "soft_loss"}
    assert history["loss"] == pytest.approx(history["soft_loss"])  # no labels: the soft term alone
    assert history["soft_loss"][-1] < 0.7 * history["soft_loss"][0]


def test_distiller_bad_arguments():
    teacher, student = _teacher(), _student()
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            kdist.Distiller(student, teacher, alpha=alpha)
    with pytest.raises(ValueError, match="temperature"):
        kdist.Distiller(student, teacher, temperature=0)
    with pytest.raises(ValueError, match="smaller than the student"):
        kdist.Distiller(teacher, student)  # swapped
    with pytest.raises(ValueError, match="same model"):
        kdist.Distiller(student, student)


def test_student_cnn_matches_the_pytorch_student():
    student = kdist.student_cnn(2)
    trainable = sum(int(np.prod(w.shape)) for w in student.trainable_weights)
    assert trainable == 97_938 == sum(p.numel() for p in distill.StudentCNN(2).parameters())
    assert student.count_params() == 97_938 + 2 * (16 + 32 + 64 + 128)  # + BN moving mean/variance
    rng = np.random.default_rng(0)
    for shape in ((3, 128, 128, 3), (2, 64, 64, 3), (1, 50, 70, 3)):
        assert tuple(student(rng.uniform(0, 255, shape).astype(np.float32), training=False).shape) == (shape[0], 2)


def test_student_layers_start_from_their_own_random_numbers():
    """One initializer per layer: a shared one would start every kernel with the same numbers, scaled."""
    keras.utils.set_random_seed(0)
    kernels = [layer.kernel.numpy().ravel() for layer in kdist.student_cnn(2).layers if hasattr(layer, "kernel")]
    leads = [k[:64] / np.abs(k).max() for k in kernels]
    assert len(leads) == 5
    assert all(np.abs(leads[i] - leads[j]).max() > 0.1 for i in range(5) for j in range(i + 1, 5))
    keras.utils.set_random_seed(0)
    again = [layer.kernel.numpy().ravel() for layer in kdist.student_cnn(2).layers if hasattr(layer, "kernel")]
    assert all(np.array_equal(a, b) for a, b in zip(kernels, again))     # and the seed still decides them


def test_port_names_the_layer_when_a_tensor_is_missing(lite0, blank_lite0):
    state = dict(lite0.state_dict())
    del state["blocks.2.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"blocks\.2\.1\.bn2"):
        km.port_lite0_weights(blank_lite0, state)


def test_port_rejects_an_extra_tensor_in_a_module(lite0, blank_lite0):
    state = dict(lite0.state_dict(), **{"conv_stem.bias": torch.ones(32)})
    with pytest.raises(ValueError, match="conv_stem"):
        km.port_lite0_weights(blank_lite0, state)



def test_swapped_arguments_stop_the_students_gradient():
    # Swapped, the stop-gradient lands on the student's logits: the soft term teaches nothing.
    teacher, student = _logits(4), _logits(5, scale=1.0)
    s = tf.Variable(student)
    with tf.GradientTape() as tape:
        loss = kdist.distillation_loss(teacher_logits=s, student_logits=tf.constant(teacher))
    g = tape.gradient(loss, s)
    assert g is None or not np.any(_np(g))


def test_distillation_loss_equals_keras_logits_distillation():
    if not hasattr(keras, "distillation"):
        pytest.skip("keras.distillation arrived in Keras 3.12")
    teacher, student = _logits(6), _logits(7, scale=1.0)
    for T in (1.0, 4.0):
        ours = float(kdist.distillation_loss(teacher_logits=teacher, student_logits=student, temperature=T))
        # An explicit KLDivergence instance: with the default loss="kl_divergence" (a string, which
        # keras.losses.get turns into a function) Keras 3.15.1 skips its softmax branch and compares
        # the scaled logits themselves, without T² (notebook 04 Keras shows the value).
        loss = keras.distillation.LogitsDistillation(temperature=T, loss=keras.losses.KLDivergence())
        theirs = float(loss.compute_loss(teacher, student))
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)


def test_distiller_step_uses_the_teacher_in_inference_mode_and_the_documented_loss():
    # A teacher with heavy dropout: called with training=True, its logits (and so the soft loss)
    # would change from the inference-mode value computed here. Learning rate 0 keeps the
    # student fixed, so the logged losses can be recomputed exactly.
    keras.utils.set_random_seed(0)
    x, y = _toy(32)
    teacher = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(64),
                                keras.layers.Dropout(0.9), keras.layers.Dense(2)])
    student = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    T, alpha = 3.0, 0.7
    distiller = kdist.Distiller(student, teacher, temperature=T, alpha=alpha)
    distiller.compile(optimizer=keras.optimizers.SGD(0.0))
    logs = distiller.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0).history
    s, t = student(x, training=False), teacher(x, training=False)
    soft = float(kdist.distillation_loss(teacher_logits=t, student_logits=s, temperature=T))
    ce = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, s))
    assert logs["soft_loss"][0] == pytest.approx(soft, rel=1e-5)
    assert logs["loss"][0] == pytest.approx(alpha * soft + (1 - alpha) * ce, rel=1e-5)
    noisy = float(kdist.distillation_loss(teacher_logits=teacher(x, training=True), student_logits=s, temperature=T))
    assert abs(noisy - soft) > 1e-3  # the check above could tell the two modes apart


def test_keras_helpers_count_freeze_and_time(k_pooled):
    model, base = km.classifier(2, seed=0)
    assert base.trainable is False
    assert km.count_parameters(model, trainable_only=True) == 1280 * 2 + 2
    assert km.count_parameters(model) == sum(p.numel() for p in models.efficientnet_lite0(num_classes=2).parameters())
    base.trainable = True
    km.freeze_batchnorm(base)
    bn = km.batchnorm_layers(base)
    assert len(bn) == 49 and not any(layer.trainable for layer in bn)
    gammas = sum(2 * layer.gamma.shape[0] for layer in bn)
    assert km.count_parameters(model, trainable_only=True) == km.count_parameters(model) - gammas
    assert km.cpu_latency_ms(kdist.student_cnn(2), 64, repeats=3, warmup=1) > 0
