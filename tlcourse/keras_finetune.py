"""Chapter 02's fine-tuning recipe in Keras 3: the last groups only, layer-wise learning rates, warm-up.

Keras's ``fit`` has one optimiser with one learning rate, and ``base.trainable = True`` trains every
layer. Chapter 02 (PyTorch) fine-tunes more carefully, and chapter 04 builds its teacher that way:

- :func:`layer_groups` cuts :func:`tlcourse.keras_models.efficientnet_lite0` into the groups of
  :func:`tlcourse.finetune.layer_groups`, from the output back: group 1 is the last stage with the
  1x1 ``conv_head`` and its BatchNorm, group 2 the stage before it, ..., group 7 the first stage with
  the stem (the head, group 0, is in the classifier around the base);
- :func:`warmup_cosine`: a linear warm-up from 1 % of the peak, then a cosine decay to 0, as
  ``finetune.warmup_cosine`` (Keras's own ``CosineDecay`` with ``warmup_target``);
- :func:`fine_tune`: the head and the last ``blocks`` groups train, each group ``layer_decay`` times
  slower than the one above it (discriminative learning rates, Howard & Ruder 2018). Keras 3 has no
  per-layer learning rates in one optimiser, and Adam's step does not change when its gradient is
  scaled, so each group gets its own ``AdamW``; one ``GradientTape`` computes every gradient at once.
  BatchNorm runs in inference mode (the ImageNet statistics stay) while the trained groups' BN scales
  and shifts still learn, as ``finetune.keep_batchnorm_eval`` does in PyTorch. ``base(x,
  training=False)`` does that here because this loop calls the layers itself; inside ``fit`` Keras
  would override it (keras-team/keras#20285, shown in notebook 02 K).

``tests/test_keras_finetune.py`` checks the groups against the PyTorch model's, parameter for
parameter, and the schedule against ``finetune.lr_curve``.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import numpy as np

from tlcourse._tf import keras, tf
from tlcourse.keras_models import LITE0_STAGES


def _group_of(name: str) -> int | None:
    """Group (1 = last stage) of a layer of :func:`keras_models.efficientnet_lite0`, by its timm name."""
    last = len(LITE0_STAGES) - 1
    if name in ("conv_head", "bn2", "bn2.act") or name.startswith(f"blocks.{last}."):
        return 1
    if name in ("conv_stem", "bn1", "bn1.act"):
        return len(LITE0_STAGES)
    if name.startswith("blocks."):
        return len(LITE0_STAGES) - int(name.split(".")[1])
    return None                                   # input, rescaling, pooling: no weights


def layer_groups(base: keras.Model) -> list[list[keras.layers.Layer]]:
    """The base's layers grouped as ``finetune.layer_groups`` groups timm's model, output first.

    Returns 7 lists for EfficientNet-Lite0: ``[last stage + conv_head + bn2, ..., first stage +
    stem]`` (index 0 here is group 1 there; the head is not in the base). Every layer with weights
    is in exactly one group. Raises ``ValueError`` for a layer with weights it cannot place.
    """
    groups: list[list] = [[] for _ in LITE0_STAGES]
    for layer in base.layers:
        g = _group_of(layer.name)
        if g is None:
            if layer.weights:
                raise ValueError(f"layer {layer.name!r} has weights but no group: is this "
                                 "keras_models.efficientnet_lite0?")
            continue
        groups[g - 1].append(layer)
    return groups


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int, start_factor: float = 0.01):
    """A learning rate rising linearly from ``start_factor * peak`` to ``peak`` over ``warmup_steps``,
    then falling along a cosine to 0 at ``total_steps`` (``finetune.warmup_cosine``'s curve)."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(peak, total_steps)
    return keras.optimizers.schedules.CosineDecay(start_factor * peak, total_steps - warmup_steps,
                                                  warmup_target=peak, warmup_steps=warmup_steps)


def fine_tune(model: keras.Model, base: keras.Model, batches: Callable[[int], Iterable], epochs: int,
              steps_per_epoch: int, blocks: int = 2, lr: float = 5e-4, layer_decay: float = 0.5,
              warmup: float = 0.2, weight_decay: float = 0.01) -> dict:
    """Fine-tune the head and the last ``blocks`` groups of ``base`` inside ``model``.

    ``model``: ``keras_models.classifier``'s ``inputs -> base -> Dropout -> Dense`` (pixels
    ``[B, H, W, 3]`` in [0, 255] -> logits ``[B, C]``); ``batches(epoch)`` yields that epoch's
    ``(pixels, labels [B])`` (fresh augmentations each epoch), ``steps_per_epoch`` of them. The head
    learns at ``lr``, group ``d`` at ``lr * layer_decay ** d``, each with ``warmup`` of the steps
    warming up, then a cosine decay; AdamW with ``weight_decay`` (PyTorch's ε, 1e-8). Everything
    else, and every BatchNorm's moving statistics, stays as it was. Leaves the model frozen
    (``trainable = False``) and returns ``{"seconds", "losses"}`` (mean loss per epoch).
    """
    groups = layer_groups(base)
    if not 0 <= blocks <= len(groups):
        raise ValueError(f"blocks must be in 0..{len(groups)}, not {blocks}")
    *_, dropout, head = model.layers
    if not isinstance(head, keras.layers.Dense):
        raise ValueError("model must end in Dropout -> Dense, as keras_models.classifier builds it")
    base.trainable = True
    for layer in base.layers:                      # freeze all but the chosen groups
        layer.trainable = False
    for group in groups[:blocks]:
        for layer in group:
            layer.trainable = True
    variables = [list(head.trainable_weights)] + [[w for layer in g for w in layer.trainable_weights]
                                                  for g in groups[:blocks]]
    total = epochs * steps_per_epoch
    optimizers = [keras.optimizers.AdamW(warmup_cosine(lr * layer_decay ** depth, total, int(warmup * total)),
                                         weight_decay=weight_decay, epsilon=1e-8)
                  for depth in range(len(variables))]
    flat = [w for ws in variables for w in ws]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = head(dropout(base(x, training=False), training=True))
            loss = loss_fn(y, logits)
        grads = tape.gradient(loss, flat)
        start = 0
        for optimizer, ws in zip(optimizers, variables):
            optimizer.apply_gradients(zip(grads[start:start + len(ws)], ws))
            start += len(ws)
        return loss

    losses, began = [], time.perf_counter()
    for epoch in range(epochs):
        epoch_losses = [float(step(x, y)) for x, y in batches(epoch)]
        if len(epoch_losses) != steps_per_epoch:
            raise ValueError(f"batches({epoch}) gave {len(epoch_losses)} batches, not steps_per_epoch = "
                             f"{steps_per_epoch}: the schedule would end early or late")
        losses.append(float(np.mean(epoch_losses)))
    model.trainable = False
    return {"seconds": time.perf_counter() - began, "losses": losses}
