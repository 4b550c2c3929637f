"""Knowledge distillation in Keras 3: Hinton et al. (2015)'s loss and a ``Distiller`` model.

The same method as :mod:`tlcourse.distill`, written the way Keras users write custom training:
a ``keras.Model`` subclass whose ``train_step`` computes the loss under a ``tf.GradientTape``
and updates the **student only**. The Keras code example "Knowledge Distillation" (Borup 2020)
overrode ``train_step`` in its Keras 2 version (its Keras 3 version overrides ``compute_loss``,
and its ``alpha`` weights the *label* loss, the opposite of α here). Keras 3.12+ also ships
``keras.distillation.Distiller``/``LogitsDistillation``; the course writes its own so that the
whole step is visible and so that cached teacher logits can travel with the batch. Two mistakes
are easy to make in such a model, and this one guards against both:

- teacher and student swapped: the soft target must be the *teacher's* distribution,
  ``KL(p_teacher || p_student)``. :func:`distillation_loss` takes its logits by keyword only, and
  the chapter checks its value against the PyTorch ``distill.kd_loss`` and Keras's
  ``LogitsDistillation`` on the same logits.
- the T² factor missing: softening by T shrinks the soft term's gradients by about 1/T², so
  without T² the soft term fades as T grows and α loses its meaning. The factor is part of
  :func:`distillation_loss`.

The teacher is frozen (``trainable = False``, so its weights, BatchNorm statistics included,
never change) and called with ``training=False`` (so its dropout is off as well).
"""

from __future__ import annotations

from tlcourse._tf import keras, tf
from tlcourse.keras_adapt import torch_kernel

ops = keras.ops


def distillation_loss(*, teacher_logits, student_logits, temperature: float = 4.0):
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` averaged over the batch; logits ``[B, C]`` -> scalar.

    Computed from log-softmaxes (no probabilities are clipped or logged), so it is exact where
    ``keras.losses.KLDivergence`` on probabilities clips them at 1e-7. Gradients flow to the
    student only: the teacher's logits are a constant target, so passing the two swapped does not
    fail; it stops the gradient to the *student* instead (the soft term then teaches nothing).
    Keyword-only, because ``distill.kd_loss`` (PyTorch) takes ``(student, teacher)``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    if tuple(teacher_logits.shape) != tuple(student_logits.shape):
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ in shape")
    T = float(temperature)
    log_p_teacher = ops.log_softmax(ops.stop_gradient(ops.cast(teacher_logits, "float32")) / T, axis=-1)
    log_p_student = ops.log_softmax(ops.cast(student_logits, "float32") / T, axis=-1)
    kl = ops.sum(ops.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return ops.mean(kl) * (T * T)


class Distiller(keras.Model):
    """Trains ``student`` to match ``teacher``: ``α · distillation_loss + (1 − α) · CE(labels)``.

    ``fit`` data: ``(images, labels)`` batches, the teacher labelling each batch as it comes
    (what Keras's example does). With ``teacher=None`` the teacher's logits were computed
    beforehand and travel with the batch: ``((images, teacher_logits), labels)``; labelling a
    fixed transfer set once is much cheaper than a teacher forward pass at every step. Batches
    without labels (``(images,)`` or ``((images, teacher_logits),)``) use the soft term alone,
    i.e. distillation from unlabelled data. ``evaluate``/``predict`` run the student.
    The constructor sets ``teacher.trainable = False`` on the caller's model (it stays frozen
    afterwards), and ``train_step`` calls it with ``training=False`` (dropout off). Metrics given to
    ``compile`` are not used.
    Metrics: ``loss``, ``soft_loss`` and the student's ``accuracy`` (training, where labels are
    given); ``evaluate`` reports the student's cross-entropy as ``loss`` and its ``accuracy``.
    """

    def __init__(self, student: keras.Model, teacher: keras.Model | None = None,
                 temperature: float = 4.0, alpha: float = 0.9, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], not {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, not {temperature}")
        if teacher is not None and teacher is student:
            raise ValueError("teacher and student are the same model")
        if teacher is not None and teacher.count_params() < student.count_params():
            # Not impossible (self-distillation uses equal sizes), but far likelier a swap.
            raise ValueError(f"The teacher ({teacher.count_params():,} parameters) is smaller than the student "
                             f"({student.count_params():,}): were the two swapped? Distiller(student, teacher).")
        self.student, self.teacher = student, teacher
        if teacher is not None:
            teacher.trainable = False
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.soft_tracker = keras.metrics.Mean(name="soft_loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @property
    def metrics(self):
        # Listed here so that fit/evaluate reset them at the start of every epoch.
        return [self.loss_tracker, self.soft_tracker, self.accuracy]

    def call(self, images, training: bool = False):
        return self.student(images, training=training)

    def _images_and_targets(self, x):
        if self.teacher is None:
            if not isinstance(x, (tuple, list)) or len(x) != 2:
                raise ValueError("Distiller(teacher=None) needs batches ((images, teacher_logits), labels)")
            return x[0], x[1]
        return x, self.teacher(x, training=False)

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        images, teacher_logits = self._images_and_targets(x)
        with tf.GradientTape() as tape:
            student_logits = self.student(images, training=True)
            soft = distillation_loss(teacher_logits=teacher_logits, student_logits=student_logits,
                                     temperature=self.temperature)
            loss = soft if y is None else self.alpha * soft + (1.0 - self.alpha) * self.cross_entropy(y, student_logits)
        variables = self.student.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        self.loss_tracker.update_state(loss)
        self.soft_tracker.update_state(soft)
        if y is None:  # no labels: there is no accuracy to report
            return {"loss": self.loss_tracker.result(), "soft_loss": self.soft_tracker.result()}
        self.accuracy.update_state(y, student_logits)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        if isinstance(x, (tuple, list)):
            x = x[0]
        student_logits = self.student(x, training=False)
        self.loss_tracker.update_state(self.cross_entropy(y, student_logits))
        self.accuracy.update_state(y, student_logits)
        return {"loss": self.loss_tracker.result(), "accuracy": self.accuracy.result()}


def student_cnn(num_classes: int, image_size: int = 64, width: int = 16, dropout: float = 0.2,
                name: str = "student") -> keras.Model:
    """The small CNN student of chapter 04 in Keras: pixels ``[B, H, W, 3]`` in ``[0, 255]`` -> logits.

    The input is resized to ``image_size`` inside the model (so it takes the teacher's crops
    as they are) and rescaled to ``[-1, 1]``. Then four 3x3 conv-BatchNorm-ReLU layers with
    ``width``, 2, 4 and 8 x ``width`` channels (the first with stride 2, max-pools after the second
    and third), global average pooling, dropout and a dense layer: at ``width=16`` and 2 classes
    97,938 trainable parameters, the same as ``tlcourse.distill.StudentCNN`` (``count_params`` also
    counts the 480 BatchNorm moving statistics). BatchNorm momentum is 0.9, PyTorch's default (0.1 in
    its convention): Keras's 0.99 averages over the last ~100 steps, too slowly for a run of a few
    hundred steps; measured on chapter 04's transfer set it made the validation accuracy swing
    between 0.58 and 0.77 over three seeds. Initialisation and BatchNorm epsilon follow PyTorch too.
    """
    # PyTorch's defaults, so that the two chapters train the same student: Conv2d/Linear weights
    # uniform with variance 1/(3 fan_in) (kaiming_uniform with a = sqrt(5)), the Linear bias uniform in
    # +-1/sqrt(fan_in), BatchNorm eps 1e-5. Keras would use Glorot-uniform and eps 1e-3. One initializer
    # per layer (torch_kernel): a shared one would start every layer from the same random numbers.
    layers = [keras.Input((None, None, 3)), keras.layers.Resizing(image_size, image_size, antialias=True),
              keras.layers.Rescaling(1 / 127.5, offset=-1.0)]
    for i, (channels, stride) in enumerate([(width, 2), (2 * width, 1), (4 * width, 1), (8 * width, 1)]):
        layers += [keras.layers.Conv2D(channels, 3, stride, padding="same", use_bias=False, kernel_initializer=torch_kernel()),
                   keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5), keras.layers.ReLU()]
        if i in (1, 2):
            layers.append(keras.layers.MaxPooling2D(2))
    bound = 1 / (8 * width) ** 0.5
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dropout(dropout),
               keras.layers.Dense(num_classes, kernel_initializer=torch_kernel(),
                                  bias_initializer=keras.initializers.RandomUniform(-bound, bound))]
    return keras.Sequential(layers, name=name)
