"""Unsupervised domain adaptation in Keras 3 (the companion of chapter 03): DANN and Deep CORAL.

The same methods as :mod:`tlcourse.adapt`, written the way Keras users write custom training:

- :func:`gradient_reversal` / :class:`GradientReversal`: the identity going forward, the gradient
  times ``-λ`` going back (Ganin & Lempitsky 2015), with ``tf.custom_gradient``; the layer keeps λ
  in a non-trainable variable, so a compiled ``train_step`` can change it at every step;
- :func:`dann_lambda` (and :func:`dann_lambda_tf` inside a graph): Ganin et al. (2016)'s schedule;
- :func:`coral_loss`: Deep CORAL (Sun & Saenko 2016), ``‖C_s − C_t‖²_F / (4 d²)``;
- :func:`domain_loss`: DANN's binary cross-entropy on the discriminator's logits;
- :func:`digit_net` (the Keras twin of ``adapt.DigitNet``) and :func:`domain_discriminator`;
- :class:`DANN`, a ``keras.Model`` whose ``train_step`` takes a source batch with labels and a
  target batch without, and :class:`CORAL`, the same step with CORAL's loss instead of the
  adversary. Source-only is either of them with ``weight=0``: the same network, batches and
  budget, without the adaptation term.

Like the other ``keras_*`` modules this one imports TensorFlow through :mod:`tlcourse._tf` and
never imports PyTorch itself (``_tf`` loads ``torch._dynamo`` first only when PyTorch is
installed), so :func:`dann_lambda` is repeated here instead of imported from ``adapt`` (which
imports torch); ``tests/test_keras_adapt.py`` checks that the two agree, as it checks the losses
and the reversal against their PyTorch versions on the same inputs.
"""

from __future__ import annotations

import math

from tlcourse._tf import keras, tf

ops = keras.ops

# PyTorch's default initialisation, so that the network starts like adapt.DigitNet: Conv2d/Linear
# weights uniform with variance 1/(3 fan_in) (kaiming_uniform with a = sqrt(5)), biases uniform in
# +-1/sqrt(fan_in); BatchNorm eps 1e-5 and momentum 0.9 (PyTorch's 0.1). Keras would use
# Glorot-uniform, zero biases, eps 1e-3 and momentum 0.99 (too slow for a run of a few hundred steps).
def torch_kernel():
    """PyTorch's Conv2d/Linear weight initialisation (uniform, variance 1/(3 fan_in)): a new one per layer.

    A Keras initializer made without a seed draws its seed from Python's ``random`` when it is
    *created* and reuses it at every call. One instance shared between layers therefore gives every
    layer the same random numbers (scaled to its fan-in), and one made when a module is imported
    ignores ``keras.utils.set_random_seed`` and changes from process to process. Made per layer,
    after the seed is set, each kernel is its own draw and follows the seed.
    """
    return keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform")


def _torch_bias(fan_in: int):
    bound = 1 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound)


def _batchnorm(**kwargs):
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, **kwargs)


# ----------------------------------------------------------------------------- gradient reversal


def gradient_reversal(x, lambd=1.0):
    """``x`` unchanged going forward; going back the upstream gradient times ``-lambd``.

    ``x``: any float tensor (``[B, d]`` features in DANN); ``lambd``: a Python float or a scalar
    tensor/variable (it gets no gradient). Written with ``tf.custom_gradient``, TensorFlow's
    counterpart of PyTorch's ``autograd.Function`` (``adapt.GradientReversal``).
    """
    lambd = tf.cast(tf.convert_to_tensor(lambd), x.dtype)

    @tf.custom_gradient
    def _reverse(inputs):
        def grad(upstream):
            # Only the input's gradient: lambd is closed over, so it needs none.
            return -lambd * upstream
        return tf.identity(inputs), grad

    return _reverse(x)


class GradientReversal(keras.layers.Layer):
    """:func:`gradient_reversal` as a layer; ``layer.lambd`` (a float) is read and set freely.

    λ lives in a non-trainable variable rather than a Python attribute: a ``train_step``
    compiled by ``tf.function`` would otherwise freeze the value it saw when it was traced.
    """

    def __init__(self, lambd: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self._lambd = self.add_weight(shape=(), initializer=keras.initializers.Constant(float(lambd)),
                                      trainable=False, name="lambd")

    @property
    def lambd(self) -> float:
        return float(self._lambd.numpy())

    @lambd.setter
    def lambd(self, value: float) -> None:
        self._lambd.assign(float(value))

    def set_lambda(self, value) -> None:
        """Set λ from inside a graph (``value`` may be a tensor)."""
        self._lambd.assign(tf.cast(value, self._lambd.dtype))

    def call(self, x):
        return gradient_reversal(x, self._lambd)

    def get_config(self):
        return {**super().get_config(), "lambd": self.lambd}


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """Ganin et al. (2016)'s reversal weight ``2 / (1 + exp(-γ p)) - 1`` for progress ``p`` in [0, 1].

    λ starts at 0 (the discriminator's gradient is noise while the features mean nothing) and
    rises towards 1. The same function as ``adapt.dann_lambda``, repeated so this module does not
    import PyTorch.
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], not {progress}")
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


def dann_lambda_tf(progress, gamma: float = 10.0):
    """:func:`dann_lambda` on a scalar tensor (clipped to [0, 1]), for use inside ``train_step``."""
    p = tf.clip_by_value(tf.cast(progress, tf.float32), 0.0, 1.0)
    return 2.0 / (1.0 + tf.exp(-gamma * p)) - 1.0


# ----------------------------------------------------------------------------- losses


def coral_loss(source, target):
    """Deep CORAL (Sun & Saenko 2016): ``‖C_s − C_t‖²_F / (4 d²)`` -> scalar.

    ``source`` ``[n_s, d]`` and ``target`` ``[n_t, d]`` are feature batches (``n ≥ 2``); ``C``
    are their unbiased (n − 1) covariance matrices ``[d, d]``, as ``torch.cov`` in
    ``adapt.coral_loss``. Zero when the second-order statistics agree. Computed in float32.
    """
    if len(source.shape) != 2 or len(target.shape) != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"expected [n, d] feature batches with the same d, got {tuple(source.shape)} "
                         f"and {tuple(target.shape)}")
    d = source.shape[1]

    def covariance(x):
        x = tf.cast(x, tf.float32)
        n = tf.cast(tf.shape(x)[0], tf.float32)
        centred = x - tf.reduce_mean(x, axis=0, keepdims=True)
        return tf.matmul(centred, centred, transpose_a=True) / (n - 1.0)   # [d, d]

    difference = covariance(source) - covariance(target)
    return tf.reduce_sum(tf.square(difference)) / float(4 * d * d)


def domain_loss(domain_logits, is_target):
    """DANN's domain loss: mean binary cross-entropy on logits ``[B]`` (or ``[B, 1]``) -> scalar.

    ``is_target`` ``[B]``: 0 for source, 1 for target features, as in ``adapt.train_adapt``'s
    ``F.binary_cross_entropy_with_logits``. From the logits (``sigmoid_cross_entropy_with_logits``,
    stable for large logits), not from clipped probabilities.
    """
    logits = tf.reshape(tf.cast(domain_logits, tf.float32), [-1])
    labels = tf.reshape(tf.cast(is_target, tf.float32), [-1])
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))


# ----------------------------------------------------------------------------- networks


class AdaptiveMaxPooling2D(keras.layers.Layer):
    """PyTorch's ``AdaptiveMaxPool2d(size)`` for channels-last ``[B, H, W, C]`` -> ``[B, size, size, C]``.

    Keras has no adaptive pooling. Output cell ``i`` covers rows ``floor(i H / size)`` to
    ``ceil((i + 1) H / size)`` (PyTorch's windows, which overlap when ``H`` is not a multiple of
    ``size``: 8 -> 7 takes 2-row windows with stride 1); max pooling over a rectangle is the max
    over its rows of the max over its columns, so it is done one axis at a time. Needs the
    spatial size at build time (the digits' size is fixed).
    """

    def __init__(self, size: int, **kwargs):
        super().__init__(**kwargs)
        self.size = int(size)

    @staticmethod
    def _windows(n: int, size: int) -> list[tuple[int, int]]:
        return [(i * n // size, -(-(i + 1) * n // size)) for i in range(size)]

    def call(self, x):
        h, w = x.shape[1], x.shape[2]
        if h is None or w is None:
            raise ValueError("AdaptiveMaxPooling2D needs a known spatial size")
        hw, ww = self._windows(h, self.size), self._windows(w, self.size)
        uniform = [(len({b - a for a, b in win}), len({b[0] - a[0] for a, b in zip(win, win[1:])}) <= 1)
                   for win in (hw, ww)]
        if all(lengths == 1 and strided for lengths, strided in uniform):
            # Equal windows at a constant stride (8 -> 7: 2 wide, stride 1): one ordinary max-pool,
            # faster than the slices below (measured ~20 % of a DigitNet step on 2 CPU cores).
            size = [hw[0][1] - hw[0][0], ww[0][1] - ww[0][0]]
            stride = [hw[1][0] - hw[0][0] if len(hw) > 1 else 1, ww[1][0] - ww[0][0] if len(ww) > 1 else 1]
            return tf.nn.max_pool2d(x, size, stride, "VALID")
        rows = tf.stack([tf.reduce_max(x[:, a:b], axis=1) for a, b in hw], axis=1)
        return tf.stack([tf.reduce_max(rows[:, :, a:b], axis=2) for a, b in ww], axis=2)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "size": self.size}


def digit_net(num_classes: int = 10, image_size: int = 16, feature_dim: int = 128,
              in_channels: int = 3) -> tuple[keras.Model, keras.Model]:
    """``adapt.DigitNet`` in Keras: ``(features, head)``.

    ``features``: images ``[B, image_size, image_size, in_channels]`` in [0, 1] (channels-last)
    -> ``[B, feature_dim]``: rescaled to [-1, 1], conv 5x5 (32) - BN - ReLU - max-pool 2,
    conv 5x5 (48) - BN - ReLU - adaptive max-pool to 7 x 7, flatten, dropout 0.3, dense
    (``feature_dim``) - BN - ReLU. ``head``: ``[B, feature_dim]`` -> logits ``[B, num_classes]``.
    Same layers, trainable-parameter count and initialisation as the PyTorch network (the widths
    32/48 are Ganin et al. 2016's MNIST network; BatchNorm as in ``adapt.DigitNet``). Two models,
    because the adaptation losses act on the features.
    """
    conv = dict(padding="same")
    flat = 48 * 7 * 7
    features = keras.Sequential([
        keras.Input((image_size, image_size, in_channels)),
        keras.layers.Rescaling(2.0, offset=-1.0),                       # [0, 1] -> [-1, 1]
        keras.layers.Conv2D(32, 5, kernel_initializer=torch_kernel(), bias_initializer=_torch_bias(in_channels * 25), **conv),
        _batchnorm(), keras.layers.ReLU(), keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(48, 5, kernel_initializer=torch_kernel(), bias_initializer=_torch_bias(32 * 25), **conv),
        _batchnorm(), keras.layers.ReLU(), AdaptiveMaxPooling2D(7),
        # Flattened channels-last (h, w, c), PyTorch flattens (c, h, w): the same numbers in
        # another order, which matters only when porting weights (not done here).
        keras.layers.Flatten(), keras.layers.Dropout(0.3),
        keras.layers.Dense(feature_dim, kernel_initializer=torch_kernel(), bias_initializer=_torch_bias(flat)),
        _batchnorm(), keras.layers.ReLU(),
    ], name="features")
    head = keras.Sequential([
        keras.Input((feature_dim,)),
        keras.layers.Dense(num_classes, kernel_initializer=torch_kernel(), bias_initializer=_torch_bias(feature_dim)),
    ], name="head")
    return features, head


def domain_discriminator(in_features: int = 128, hidden: int = 256) -> keras.Model:
    """``adapt.DomainDiscriminator`` in Keras: features ``[B, in_features]`` -> one logit ``[B, 1]``.

    Two hidden dense-BN-ReLU layers (as TLlib's discriminator), then one logit for "target".
    """
    layers = [keras.Input((in_features,))]
    for fan_in in (in_features, hidden):
        layers += [keras.layers.Dense(hidden, kernel_initializer=torch_kernel(), bias_initializer=_torch_bias(fan_in)),
                   _batchnorm(), keras.layers.ReLU()]
    layers.append(keras.layers.Dense(1, kernel_initializer=torch_kernel(), bias_initializer=_torch_bias(hidden)))
    return keras.Sequential(layers, name="discriminator")


class AnnealedLR(keras.optimizers.schedules.LearningRateSchedule):
    """Ganin et al. (2016)'s learning-rate annealing ``lr / (1 + 10 p)^0.75``, ``p = step / steps``
    (``adapt.train_adapt``'s schedule)."""

    def __init__(self, lr: float, steps: int):
        self.lr, self.steps = float(lr), int(steps)

    def __call__(self, step):
        p = tf.cast(step, tf.float32) / float(self.steps)
        return self.lr * (1.0 + 10.0 * p) ** -0.75

    def get_config(self):
        return {"lr": self.lr, "steps": self.steps}


# ----------------------------------------------------------------------------- the models


class DANN(keras.Model):
    """Domain-adversarial training (Ganin et al. 2016) as a ``keras.Model`` with its own ``train_step``.

    ``fit`` data: ``((source_images [B, H, W, C], target_images [B, H, W, C]), source_labels [B])``
    batches, images in [0, 1]; the target's labels are never given. Each step passes source and
    target through ``features`` **together** (one batch of ``2B``: BatchNorm sees both domains, as
    in ``adapt.train_adapt``), and minimises

        ``CE(head(f_source), labels) + weight · adaptation_loss(f_source, f_target)``

    where DANN's adaptation loss is :func:`domain_loss` of ``discriminator(reversal(f))`` with
    source 0 and target 1: the discriminator learns to tell the domains apart, and through the
    reversal the features learn to make that harder. λ follows :func:`dann_lambda_tf` of the
    progress ``p = optimizer.iterations / total_steps``, set on the reversal layer at every step.
    ``weight=0`` is source-only training with the same joint batches (no adaptation term; the
    discriminator is then not run).

    ``call`` / ``predict`` / ``evaluate`` use ``head(features(x))``; ``evaluate`` takes
    ``(images, labels)`` and reports ``loss`` (cross-entropy) and ``accuracy``.
    Training metrics: ``loss`` (source cross-entropy), ``adapt_loss``, ``accuracy`` (source
    batch) and ``lambda``.
    """

    def __init__(self, features: keras.Model, head: keras.Model, total_steps: int,
                 discriminator: keras.Model | None = None, weight: float = 1.0, gamma: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, not {total_steps}")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, not {weight}")
        self.features, self.head = features, head
        self.total_steps, self.weight, self.gamma = int(total_steps), float(weight), float(gamma)
        self.discriminator = self._make_discriminator(discriminator)
        self.reversal = GradientReversal(0.0, name="gradient_reversal")
        self.cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.adapt_tracker = keras.metrics.Mean(name="adapt_loss")
        self.lambda_tracker = keras.metrics.Mean(name="lambda")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def _make_discriminator(self, discriminator):
        return discriminator if discriminator is not None else domain_discriminator(self.features.output_shape[-1])

    @property
    def metrics(self):
        # Listed so that fit/evaluate reset them at the start of every epoch.
        return [self.loss_tracker, self.adapt_tracker, self.accuracy, self.lambda_tracker]

    def build(self, input_shape=None):
        # The parts are built when made (Sequential models with an Input); nothing is left to create.
        self.built = True

    def call(self, images, training: bool = False):
        return self.head(self.features(images, training=training), training=training)

    def adaptation_loss(self, source_features, target_features):
        """DANN's term: the discriminator's BCE through the gradient reversal (source 0, target 1)."""
        joint = tf.concat([source_features, target_features], axis=0)                  # [2B, d]
        logits = self.discriminator(self.reversal(joint), training=True)                # [2B, 1]
        is_target = tf.concat([tf.zeros(tf.shape(source_features)[:1]), tf.ones(tf.shape(target_features)[:1])], 0)
        return domain_loss(logits, is_target)

    def _variables_to_train(self):
        variables = self.features.trainable_variables + self.head.trainable_variables
        if self.weight > 0 and self.discriminator is not None:
            variables += self.discriminator.trainable_variables
        return variables

    def train_step(self, data):
        (source_x, target_x), source_y, _ = keras.utils.unpack_x_y_sample_weight(data)
        # p before this step's update, as adapt.train_adapt's `step / steps` (0 at the first step).
        lam = dann_lambda_tf(tf.cast(self.optimizer.iterations, tf.float32) / self.total_steps, self.gamma)
        self.reversal.set_lambda(lam)
        batch = tf.shape(source_x)[0]
        with tf.GradientTape() as tape:
            joint = self.features(tf.concat([source_x, target_x], axis=0), training=True)   # [2B, d]
            source_f, target_f = joint[:batch], joint[batch:]
            logits = self.head(source_f, training=True)
            loss = self.cross_entropy(source_y, logits)
            if self.weight > 0:      # a Python branch: source-only never builds the adaptation term
                adapt_loss = self.adaptation_loss(source_f, target_f)
                total = loss + self.weight * adapt_loss
            else:
                adapt_loss, total = tf.zeros(()), loss
        variables = self._variables_to_train()
        self.optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))
        self.loss_tracker.update_state(loss)
        self.adapt_tracker.update_state(adapt_loss)
        self.lambda_tracker.update_state(lam)
        self.accuracy.update_state(source_y, logits)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        logits = self(x, training=False)
        self.loss_tracker.update_state(self.cross_entropy(y, logits))
        self.accuracy.update_state(y, logits)
        return {"loss": self.loss_tracker.result(), "accuracy": self.accuracy.result()}


class CORAL(DANN):
    """Deep CORAL (Sun & Saenko 2016): :class:`DANN`'s step with :func:`coral_loss` of the source and
    target features as the adaptation term, no discriminator and no reversal (λ is reported but
    unused). ``weight`` must be large (chapter 03 uses 20): the loss is divided by ``4 d²``."""

    def _make_discriminator(self, discriminator):
        if discriminator is not None:
            raise ValueError("CORAL has no discriminator")
        return None

    def adaptation_loss(self, source_features, target_features):
        return coral_loss(source_features, target_features)


def paired_datasets(source_x, source_y, target_x, batch_size: int, seed: int):
    """An endless ``tf.data`` of ``((source [B, ...], target [B, ...]), labels [B])`` batches.

    Source and target are shuffled separately (a new permutation every pass, from ``seed`` and
    ``seed + 1``) and zipped; ``drop_remainder`` so every step sees ``2B`` images, as
    ``adapt.batches``. The same ``seed`` gives the same batches to every arm of a comparison.
    """
    source = (tf.data.Dataset.from_tensor_slices((source_x, source_y))
              .shuffle(len(source_x), seed=seed, reshuffle_each_iteration=True).repeat()
              .batch(batch_size, drop_remainder=True))
    target = (tf.data.Dataset.from_tensor_slices(target_x)
              .shuffle(len(target_x), seed=seed + 1, reshuffle_each_iteration=True).repeat()
              .batch(batch_size, drop_remainder=True))
    return (tf.data.Dataset.zip((source, target))
            .map(lambda s, t: ((s[0], t), s[1])).prefetch(tf.data.AUTOTUNE))


__all__ = ["gradient_reversal", "GradientReversal", "dann_lambda", "dann_lambda_tf", "coral_loss", "domain_loss",
           "AdaptiveMaxPooling2D", "digit_net", "domain_discriminator", "AnnealedLR", "DANN", "CORAL",
           "paired_datasets"]
