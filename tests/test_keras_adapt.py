"""The Keras companion of chapter 03 (``tlcourse.keras_adapt``) against the PyTorch chapter's ``adapt``.

Losses, the gradient reversal and the λ schedule are compared with their PyTorch versions on the same
inputs; the models are trained for a few steps on tiny random images. Well under a minute on two cores.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("keras") is None:
    pytest.skip("TensorFlow and Keras 3 are not installed (pip install 'tlcourse[tensorflow]')",
                allow_module_level=True)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tlcourse import adapt  # noqa: E402
from tlcourse import keras_adapt as ka  # noqa: E402 - imports TensorFlow through tlcourse._tf
from tlcourse._tf import keras, tf  # noqa: E402

# Keras 3.15's convert_to_numpy calls np.array(tensor, copy=False) on TensorFlow tensors (noise only).
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
              pytest.mark.filterwarnings("ignore:.*shuffle=True.*:UserWarning")]   # our tf.data shuffles itself


# --- losses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_s, n_t, d, scale", [(64, 64, 128, 1.0), (5, 9, 3, 1.0), (32, 17, 16, 30.0),
                                                (128, 64, 8, 1e-3), (2, 2, 1, 1.0)])
def test_coral_loss_equals_pytorch(n_s, n_t, d, scale):
    rng = np.random.default_rng(d + n_s)
    source = (rng.normal(size=(n_s, d)) * scale).astype("float32")
    # The target shifted and stretched, so the two covariances differ by a lot or by little.
    target = (rng.normal(size=(n_t, d)) * scale * rng.uniform(0.5, 2.0, d) + 1.0).astype("float32")
    keras_value = float(ka.coral_loss(source, target))
    torch_value = float(adapt.coral_loss(torch.from_numpy(source), torch.from_numpy(target)))
    assert keras_value > 0
    assert abs(keras_value - torch_value) <= 1e-5 * max(1.0, abs(torch_value)), (keras_value, torch_value)
    assert float(ka.coral_loss(source, source)) == pytest.approx(0.0, abs=1e-12 + 1e-6 * keras_value)


def test_coral_loss_gradients_equal_pytorch():
    rng = np.random.default_rng(1)
    source, target = rng.normal(size=(16, 6)).astype("float32"), rng.normal(size=(12, 6)).astype("float32") * 2
    s = tf.Variable(source)
    with tf.GradientTape() as tape:
        loss = ka.coral_loss(s, target)
    keras_grad = tape.gradient(loss, s).numpy()
    ts = torch.from_numpy(source).requires_grad_()
    adapt.coral_loss(ts, torch.from_numpy(target)).backward()
    np.testing.assert_allclose(keras_grad, ts.grad.numpy(), atol=1e-6, rtol=1e-4)


def test_coral_loss_bad_shapes():
    with pytest.raises(ValueError, match="same d"):
        ka.coral_loss(np.zeros((4, 3), "float32"), np.zeros((4, 2), "float32"))
    with pytest.raises(ValueError, match="feature batches"):
        ka.coral_loss(np.zeros((4,), "float32"), np.zeros((4, 2), "float32"))


def test_domain_loss_equals_pytorch_bce_with_logits():
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=(64, 1)) * 5).astype("float32")
    logits[0, 0], logits[1, 0] = 80.0, -80.0                     # far in the tails: stable from logits
    is_target = np.r_[np.zeros(32), np.ones(32)].astype("float32")
    keras_value = float(ka.domain_loss(logits, is_target))
    torch_value = float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits[:, 0]), torch.from_numpy(is_target)))
    assert np.isfinite(keras_value)
    assert abs(keras_value - torch_value) <= 1e-5 * max(1.0, torch_value)


# --- gradient reversal and λ -------------------------------------------------------------------


@pytest.mark.parametrize("lambd", [0.0, 0.3, 1.0, 2.5])
def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward(lambd):
    rng = np.random.default_rng(3)
    x_np = rng.normal(size=(8, 5)).astype("float32")
    upstream = rng.normal(size=(8, 5)).astype("float32")
    layer = ka.GradientReversal(0.0)
    layer.lambd = lambd                                          # settable after construction
    assert layer.lambd == pytest.approx(lambd)
    x = tf.Variable(x_np)
    for reverse in (lambda v: ka.gradient_reversal(v, lambd), layer):
        with tf.GradientTape() as tape:
            y = reverse(x)
            loss = tf.reduce_sum(y * upstream)                   # d loss / d y = upstream
        gradient = tape.gradient(loss, x).numpy()
        np.testing.assert_array_equal(y.numpy(), x_np)
        np.testing.assert_allclose(gradient, -lambd * upstream, rtol=1e-6, atol=1e-7)
    # ... and what PyTorch's adapt.grad_reverse gives on the same input and upstream gradient.
    xt = torch.from_numpy(x_np).requires_grad_()
    (adapt.grad_reverse(xt, lambd) * torch.from_numpy(upstream)).sum().backward()
    np.testing.assert_allclose(gradient, xt.grad.numpy(), rtol=1e-6, atol=1e-7)


def test_gradient_reversal_lambda_can_change_inside_a_compiled_function():
    layer = ka.GradientReversal(1.0)
    x = tf.Variable(tf.ones((3,)))

    @tf.function
    def gradient(lam):
        layer.set_lambda(lam)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x))
        return tape.gradient(loss, x)

    # Traced once; a λ baked in as a Python constant would give -0.5 both times.
    assert gradient(tf.constant(0.5)).numpy().tolist() == [-0.5] * 3
    assert gradient(tf.constant(2.0)).numpy().tolist() == [-2.0] * 3


def test_lambda_schedule_matches_adapt():
    for p in np.linspace(0, 1, 21):
        assert ka.dann_lambda(float(p)) == pytest.approx(adapt.dann_lambda(float(p)), abs=1e-12)
        assert float(ka.dann_lambda_tf(p)) == pytest.approx(adapt.dann_lambda(float(p)), abs=1e-6)
    assert ka.dann_lambda(0.3, gamma=5) == pytest.approx(adapt.dann_lambda(0.3, gamma=5))
    with pytest.raises(ValueError, match="progress"):
        ka.dann_lambda(1.5)


# --- networks and training ---------------------------------------------------------------------


def test_networks_match_the_pytorch_ones():
    features, head = ka.digit_net(10, image_size=16)
    count = lambda model: sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert count(features) + count(head) == sum(p.numel() for p in adapt.DigitNet().parameters())
    assert features.output_shape == (None, 128) and head.output_shape == (None, 10)
    assert count(ka.domain_discriminator(128)) == sum(p.numel() for p in adapt.DomainDiscriminator(128).parameters())


@pytest.mark.parametrize("size", [(8, 8), (14, 14), (9, 11), (7, 7)])
def test_adaptive_max_pooling_equals_pytorch(size):
    x = np.random.default_rng(4).normal(size=(2, *size, 3)).astype("float32")
    keras_out = ka.AdaptiveMaxPooling2D(7)(x).numpy()
    torch_out = torch.nn.AdaptiveMaxPool2d(7)(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(keras_out, torch_out)


def _tiny(steps, cls=ka.DANN, weight=1.0, seed=0):
    rng = np.random.default_rng(seed)
    xs, ys = rng.random((48, 16, 16, 3), dtype=np.float32), rng.integers(0, 10, 48)
    xt = np.clip(rng.random((48, 16, 16, 3), dtype=np.float32) * 0.5 + 0.5, 0, 1)   # another "domain"
    keras.utils.set_random_seed(seed)
    features, head = ka.digit_net(10, image_size=16)
    model = cls(features, head, total_steps=steps, weight=weight)
    model.compile(optimizer=keras.optimizers.SGD(ka.AnnealedLR(0.01, steps), momentum=0.9, nesterov=True))
    return model, ka.paired_datasets(xs, ys, xt, batch_size=16, seed=seed), (xs, ys)


def _weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


def _changed(before, after):
    return all(not np.array_equal(a, b) for a, b in zip(before, after) if a.ndim > 1)   # kernels


def test_dann_fit_trains_discriminator_and_features_and_follows_the_schedule():
    steps = 6
    model, data, (xs, ys) = _tiny(steps)
    before_d, before_f = _weights(model.discriminator), _weights(model.features)
    history = model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0).history
    assert _changed(before_d, _weights(model.discriminator)) and _changed(before_f, _weights(model.features))
    # λ is set at each step from the progress before it: the last step ran with p = (steps - 1) / steps,
    # and the reported mean is over the steps' values.
    assert model.reversal.lambd == pytest.approx(adapt.dann_lambda((steps - 1) / steps), abs=1e-6)
    expected_mean = np.mean([adapt.dann_lambda(i / steps) for i in range(steps)])
    assert history["lambda"][-1] == pytest.approx(expected_mean, abs=1e-5)
    assert np.isfinite(history["adapt_loss"][-1]) and history["adapt_loss"][-1] > 0
    result = model.evaluate(xs, ys, verbose=0, return_dict=True)
    assert set(result) == {"loss", "accuracy"} and 0 <= result["accuracy"] <= 1
    assert model.predict(xs[:5], verbose=0).shape == (5, 10)


def test_source_only_and_coral_share_the_start_and_differ_only_in_the_loss():
    steps = 3
    source_only, data, _ = _tiny(steps, weight=0.0)
    coral, _, _ = _tiny(steps, cls=ka.CORAL, weight=20.0)
    assert coral.discriminator is None
    # Same seed: the same initial features and head in both arms (a paired comparison).
    for a, b in zip(_weights(source_only.features) + _weights(source_only.head),
                    _weights(coral.features) + _weights(coral.head)):
        np.testing.assert_array_equal(a, b)
    disc_before = _weights(source_only.discriminator)
    h0 = source_only.fit(data, steps_per_epoch=steps, epochs=1, verbose=0).history
    h1 = coral.fit(data, steps_per_epoch=steps, epochs=1, verbose=0).history
    assert h0["adapt_loss"][-1] == 0.0 and h1["adapt_loss"][-1] > 0
    # Weight 0: the discriminator is never trained.
    assert all(np.array_equal(a, b) for a, b in zip(disc_before, _weights(source_only.discriminator)))
    assert not all(np.array_equal(a, b) for a, b in zip(_weights(source_only.features), _weights(coral.features)))


def test_bad_arguments():
    features, head = ka.digit_net(10, image_size=16)
    with pytest.raises(ValueError, match="total_steps"):
        ka.DANN(features, head, total_steps=0)
    with pytest.raises(ValueError, match="weight"):
        ka.DANN(features, head, total_steps=5, weight=-1)
    with pytest.raises(ValueError, match="no discriminator"):
        ka.CORAL(features, head, total_steps=5, discriminator=ka.domain_discriminator())


def test_paired_datasets_are_seeded():
    xs = np.arange(20, dtype="float32").reshape(20, 1)
    first = [b for b in ka.paired_datasets(xs, np.arange(20), xs + 100, 4, seed=7).take(6)]
    again = [b for b in ka.paired_datasets(xs, np.arange(20), xs + 100, 4, seed=7).take(6)]
    for ((s1, t1), y1), ((s2, t2), y2) in zip(first, again):
        np.testing.assert_array_equal(s1, s2)
        np.testing.assert_array_equal(t1, t2)
        np.testing.assert_array_equal(s1.numpy()[:, 0], y1.numpy())        # labels travel with their images
        assert s1.shape == (4, 1) and t1.shape == (4, 1) and t1.numpy().min() >= 100


def test_kernels_follow_the_seed_and_each_layer_draws_its_own():
    """One initializer per layer (``ka.torch_kernel``): a shared unseeded instance would give every layer
    the same random numbers and ignore ``keras.utils.set_random_seed``."""
    def kernels(seed):
        keras.utils.set_random_seed(seed)
        features, head = ka.digit_net(10, 16)
        return [layer.kernel.numpy() for model in (features, head) for layer in model.layers if hasattr(layer, "kernel")]
    first, again, other = kernels(0), kernels(0), kernels(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not any(np.array_equal(a, b) for a, b in zip(first, other))
    leads = [k.ravel()[:64] / np.abs(k).max() for k in first]       # no two layers start alike
    assert all(np.abs(leads[i] - leads[j]).max() > 0.1 for i in range(len(leads)) for j in range(i + 1, len(leads)))
