"""Multi-task learning in Keras 3 (the companion of chapter 05): one shared trunk, one head per task.

The same methods as :mod:`tlcourse.multitask`, written the way Keras users write them:

- :class:`Task` and :data:`TASKS` — the chapter's tasks (``left``, ``right``, ``sum``, ``same``) with
  the same losses, targets and metrics; :func:`task_loss` / :func:`task_losses`, :func:`evaluate`;
- :func:`digit_trunk` (chapter 05's shared backbone: ``keras_adapt.digit_net``'s feature extractor,
  PyTorch's initialisation and BatchNorm settings) and :func:`multitask_model`, a *functional*
  ``keras.Model`` with one shared trunk and one head per task (hard parameter sharing, Caruana 1997)
  whose output is ``{task: prediction}``; :func:`single_task_model` puts one separate network per task
  in one model (nothing shared) for the baseline; :func:`shared_and_head_variables`;
- loss weightings as layers that map ``{task: loss}`` to one loss and register it with ``add_loss``:
  :class:`FixedWeights` (equal weights are all ones), :class:`UncertaintyWeighting` (Kendall, Gal &
  Cipolla 2018; trainable log-variances), :class:`RandomWeights` (Lin et al. 2022) and
  :class:`PCGrad` (Yu et al. 2020), whose gradient surgery is :func:`pcgrad_combine`;
  :func:`make_weighting`;
- :class:`MultiTask`, a ``keras.Model`` whose ``train_step`` sums what ``add_loss`` registered and,
  for PCGrad, takes one gradient per task from a persistent ``GradientTape`` on the shared trunk;
- :func:`multitask_dataset`, a seeded ``tf.data`` pipeline of ``(images, {task: target})``;
  :class:`WeightHistory`, a callback recording the weighting's weights after every step.

Like the other ``keras_*`` modules it imports TensorFlow through :mod:`tlcourse._tf` and never imports
PyTorch, so the tasks are repeated here rather than imported from ``multitask`` (which imports torch);
``tests/test_keras_multitask.py`` checks that the two agree, and that the losses, the uncertainty
weighting (value and gradients) and PCGrad equal their PyTorch versions on the same inputs. The data are
chapter 05's (``multitask.multi_digits``, the MultiMNIST construction of Sener & Koltun 2018).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from tlcourse._tf import keras, tf
from tlcourse.keras_adapt import digit_net, torch_kernel

ops = keras.ops

# ----------------------------------------------------------------------------- tasks

# Each kind's losses, the default first (multitask.Task's choices).
LOSSES = {"classification": ("cross_entropy",), "regression": ("mse", "smooth_l1")}


@dataclass(frozen=True)
class Task:
    """One task, as ``multitask.Task``: what its head predicts and the loss that trains it.

    ``classification``: ``num_classes`` logits ``[B, C]``, target int ``[B]``, cross-entropy, accuracy.
    ``regression``: one number ``[B]`` that predicts the *standardised* target ``(y - shift) / scale``,
    loss ``"mse"`` (or ``"smooth_l1"``), metric the mean absolute error in the target's units.
    """

    name: str
    kind: str
    num_classes: int | None = None
    loss: str | None = None
    shift: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        allowed = LOSSES.get(self.kind, ())
        problem = (f"kind must be one of {', '.join(LOSSES)}, not {self.kind!r}" if not allowed else
                   "a classification needs num_classes >= 2"
                   if self.kind == "classification" and (self.num_classes or 0) < 2 else
                   f"a {self.kind} takes the loss {' or '.join(allowed)}, not {self.loss!r}"
                   if (self.loss or allowed[0]) not in allowed else
                   "scale must be positive" if self.scale <= 0 else None)
        if problem:
            raise ValueError(f"task {self.name!r}: {problem}")
        object.__setattr__(self, "loss", self.loss or allowed[0])

    @property
    def out_features(self) -> int:
        return self.num_classes if self.kind == "classification" else 1


# The same registry as multitask.TASKS: sum = left + right of two independent digits, mean 9,
# variance 2 x 8.25, so the standardised sum starts on the scale of a cross-entropy.
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("left", "classification", 10),
    Task("right", "classification", 10),
    Task("sum", "regression", shift=9.0, scale=math.sqrt(16.5)),
    Task("same", "classification", 2),
)}


def get_tasks(tasks) -> list[Task]:
    """Names from :data:`TASKS`, :class:`Task` objects, or any objects with ``Task``'s fields (such as
    ``multitask.Task``) -> a list of :class:`Task` with distinct names."""
    def one(t):
        if isinstance(t, Task):
            return t
        if not isinstance(t, str):
            return Task(t.name, t.kind, t.num_classes, t.loss, float(t.shift), float(t.scale))
        if t not in TASKS:
            raise ValueError(f"no task named {t!r}; the registered ones are {', '.join(TASKS)}")
        return TASKS[t]

    out = [one(t) for t in ([tasks] if isinstance(tasks, str) or hasattr(tasks, "kind") else tasks)]
    names = [t.name for t in out]
    if not out or len(set(names)) != len(names):
        raise ValueError(f"need at least one task and distinct names, got {names}")
    return out


def task_loss(task: Task, output, target):
    """The mean loss of a batch (float32 scalar), as ``multitask.Task.compute_loss``.

    ``output``: logits ``[B, C]`` (classification) or predictions ``[B]`` (regression);
    ``target``: ``[B]`` class indices or raw values (standardised here with ``shift``/``scale``).
    """
    output = ops.cast(output, "float32")
    if task.kind == "classification":
        if len(output.shape) != 2 or output.shape[-1] != task.num_classes:
            raise ValueError(f"task {task.name!r}: expected logits [B, {task.num_classes}], got {tuple(output.shape)}")
        return ops.mean(keras.losses.sparse_categorical_crossentropy(ops.cast(target, "int32"), output,
                                                                     from_logits=True))
    if len(output.shape) != 1:
        raise ValueError(f"task {task.name!r}: expected predictions [B], got {tuple(output.shape)}")
    error = output - (ops.cast(target, "float32") - task.shift) / task.scale
    if task.loss == "mse":
        return ops.mean(ops.square(error))
    absolute = ops.abs(error)              # smooth L1 with beta 1 (PyTorch's default)
    return ops.mean(ops.where(absolute < 1.0, 0.5 * ops.square(error), absolute - 0.5))


def task_losses(outputs: Mapping, targets: Mapping, tasks: Sequence[Task]) -> dict:
    """``{task: scalar loss}`` from the model's ``{task: output}`` and the targets ``{task: [B]}``."""
    missing = [t.name for t in tasks if t.name not in outputs or t.name not in targets]
    if missing:
        raise KeyError(f"no output or target for task(s) {', '.join(missing)}; outputs {', '.join(outputs)}, "
                       f"targets {', '.join(targets)}")
    return {t.name: task_loss(t, outputs[t.name], targets[t.name]) for t in tasks}


def score(task: Task, output, target) -> float:
    """The task's metric: accuracy, or mean absolute error in the target's units (``decode``d)."""
    output, target = np.asarray(output, dtype=np.float32), np.asarray(target)
    if task.kind == "classification":
        return float((output.argmax(axis=1) == target).mean())
    return float(np.abs(output * task.scale + task.shift - target.astype(np.float32)).mean())


def evaluate(model: keras.Model, images, targets: Mapping, tasks, batch_size: int = 500) -> dict[str, float]:
    """Each task's metric on ``images`` ``[N, H, W, C]`` (inference mode): ``{task: accuracy or MAE}``."""
    tasks = get_tasks(tasks)
    parts = [model(images[i:i + batch_size], training=False) for i in range(0, len(images), batch_size)]
    return {t.name: score(t, np.concatenate([np.asarray(p[t.name]) for p in parts]), targets[t.name])
            for t in tasks}


# ----------------------------------------------------------------------------- models


def digit_trunk(image_size: int = 28, in_channels: int = 1, feature_dim: int = 128, name: str = "trunk") -> keras.Model:
    """Chapter 05's shared backbone (``multitask.digit_backbone``) in Keras:
    images ``[B, S, S, in_channels]`` in [0, 1] -> features ``[B, feature_dim]``.

    ``keras_adapt.digit_net``'s feature extractor (chapter 03's ``DigitNet`` without its head: two
    conv-BatchNorm-ReLU-pool blocks of 32 and 48 channels and a ``feature_dim`` bottleneck), with
    PyTorch's initialisation and BatchNorm settings (one initializer per layer, so every kernel is
    its own draw and follows ``keras.utils.set_random_seed``: :func:`keras_adapt.torch_kernel`).
    """
    features, _ = digit_net(10, image_size=image_size, feature_dim=feature_dim, in_channels=in_channels)
    features.name = name
    return features


def _head(task: Task, features):
    bound = 1 / math.sqrt(features.shape[-1])
    out = keras.layers.Dense(task.out_features, name=task.name, kernel_initializer=torch_kernel(),
                             bias_initializer=keras.initializers.RandomUniform(-bound, bound))(features)
    return ops.squeeze(out, axis=-1) if task.kind == "regression" else out     # [B, 1] -> [B]


def multitask_model(tasks, trunk: keras.Model | None = None, image_size: int = 28, in_channels: int = 1,
                    name: str = "multitask") -> keras.Model:
    """Hard parameter sharing as a functional model: ``{task: head_t(trunk(x))}``.

    ``images [B, S, S, C]`` -> ``{"left": [B, 10], "right": [B, 10], "sum": [B], ...}``: one trunk
    (default :func:`digit_trunk`, the layer named ``"trunk"``) whose features every head reads, and a
    linear head per task (named after it). The twin of ``multitask.multitask_net``: the same layers
    and parameter count.
    """
    tasks = get_tasks(tasks)
    trunk = trunk if trunk is not None else digit_trunk(image_size, in_channels)
    inputs = keras.Input(trunk.input_shape[1:], name="images")
    features = trunk(inputs)                     # computed once, read by every head
    return keras.Model(inputs, {t.name: _head(t, features) for t in tasks}, name=name)


def single_task_model(tasks, image_size: int = 28, in_channels: int = 1) -> keras.Model:
    """The baseline: one separate network per task (trunk ``"trunk_<task>"`` and its head) in one model.

    Nothing is shared, so the gradient of ``Σ_t L_t`` on network t's weights is ``∇L_t`` alone:
    training this model with equal weights trains each network on its own task, with the same
    batches, in one compiled step instead of three fits.
    """
    tasks = get_tasks(tasks)
    inputs = keras.Input((image_size, image_size, in_channels), name="images")
    outputs = {}
    for t in tasks:
        features = digit_trunk(image_size, in_channels, name=f"trunk_{t.name}")(inputs)
        outputs[t.name] = _head(t, features)
    return keras.Model(inputs, outputs, name="single_task")


def shared_and_head_variables(model: keras.Model) -> tuple[list, list]:
    """``(shared, heads)``: the trainable variables of the layer named ``"trunk"`` and all the others.
    A model without a ``"trunk"`` layer (e.g. :func:`single_task_model`) shares nothing: ``([], all)``."""
    try:
        shared = list(model.get_layer("trunk").trainable_variables)
    except ValueError:
        shared = []
    ids = {id(v) for v in shared}
    return shared, [v for v in model.trainable_variables if id(v) not in ids]


# ----------------------------------------------------------------------------- weightings


class FixedWeights(keras.layers.Layer):
    """``Σ_t w_t L_t`` with fixed weights ``{task: w}`` (equal weighting: all ones), as ``multitask.FixedWeights``.

    Called on ``{task: scalar loss}``, the layer registers the combined loss with ``add_loss`` and
    returns the losses unchanged (like the uncertainty-weighting layer of Kendall et al.'s own Keras
    example, which returns its inputs). So the combined loss is found in ``layer.losses`` and in the
    ``losses`` of any model that holds the layer, never in the layer's output. The weights live in a
    non-trainable variable ``w`` ``[T]`` (in :attr:`names` order), which a compiled step reads afresh.
    """

    def __init__(self, weights: Mapping[str, float], **kwargs):
        super().__init__(**kwargs)
        if not weights:
            raise ValueError(f"{type(self).__name__} needs at least one task")
        self.names = list(weights)
        self.w = self.add_weight(shape=(len(self.names),), trainable=False, name="w",
                                 initializer=keras.initializers.Constant([float(weights[n]) for n in self.names]))
        self.built = True          # its variables do not depend on an input shape

    def _stack(self, losses: Mapping):
        missing = [n for n in self.names if n not in losses]
        if missing:
            raise KeyError(f"no loss for task(s) {', '.join(missing)}; got {', '.join(losses)}")
        return ops.stack([ops.cast(losses[n], "float32") for n in self.names])      # [T]

    def combined(self, losses: Mapping):
        """The scalar this layer adds with ``add_loss``."""
        return ops.sum(self.w * self._stack(losses))

    def call(self, losses):
        self.add_loss(self.combined(losses))
        return losses

    def weight_vector(self) -> np.ndarray:
        """The weight each task's loss gets now, ``[T]`` in :attr:`names` order."""
        return np.asarray(self.w)

    def weights_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.weight_vector().tolist()))


class UncertaintyWeighting(FixedWeights):
    """Kendall, Gal & Cipolla (2018): each task weighted by a learned homoscedastic uncertainty.

    Trainable log-variances ``s_t = log σ_t²`` (``log_vars`` ``[T]``, starting at ``init``) and the
    joint loss of ``multitask.UncertaintyWeighting``, registered with ``add_loss``::

        Σ_t c_t exp(-s_t) L_t + ½ s_t,    c_t = 1 (classification), ½ (regression)

    i.e. ``L/σ² + log σ`` for classification and ``L/(2σ²) + log σ`` for regression. A task's weight
    ``c_t exp(-s_t)`` (:meth:`weight_vector`) is smallest where its loss is large; the ``½ s_t`` term
    keeps the weights from all going to zero. For a fixed loss the best ``s`` is ``log(2 c L)``.
    """

    def __init__(self, tasks, init: float = 0.0, **kwargs):
        tasks = get_tasks(tasks)
        super().__init__({t.name: 1.0 for t in tasks}, **kwargs)
        self.c = [1.0 if t.kind == "classification" else 0.5 for t in tasks]
        self.log_vars = self.add_weight(shape=(len(tasks),), initializer=keras.initializers.Constant(float(init)),
                                        trainable=True, name="log_vars")

    def combined(self, losses: Mapping):
        s = self.log_vars
        return ops.sum(ops.convert_to_tensor(self.c) * ops.exp(-s) * self._stack(losses) + 0.5 * s)

    def weight_vector(self) -> np.ndarray:
        return np.asarray(self.c, dtype=np.float32) * np.exp(-np.asarray(self.log_vars))


class RandomWeights(FixedWeights):
    """Random loss weighting (Lin et al. 2022): fresh weights ``T · softmax(λ)``, ``λ ~ N(0, I)``, at
    every call, as ``multitask.RandomWeights`` (summing to ``T`` like equal weights). The draws come
    from a ``keras.random.SeedGenerator(seed)``, whose state is a variable: a compiled step draws
    anew at every step."""

    def __init__(self, tasks, seed: int = 0, **kwargs):
        super().__init__({t.name: 1.0 for t in get_tasks(tasks)}, **kwargs)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, losses):
        lam = keras.random.normal((len(self.names),), seed=self.seed_generator)
        self.w.assign(len(self.names) * ops.softmax(lam))
        return super().call(losses)


class PCGrad(FixedWeights):
    """PCGrad (Yu et al. 2020): the weighted sum (default all ones) for the heads and for logging;
    :class:`MultiTask` combines the shared trunk's per-task gradients with :func:`pcgrad_combine`
    in the orders :meth:`draw_orders` gives (a ``SeedGenerator``, so every step draws new ones)."""

    def __init__(self, tasks_or_weights, seed: int = 0, **kwargs):
        if not isinstance(tasks_or_weights, Mapping):
            tasks_or_weights = {t.name: 1.0 for t in get_tasks(tasks_or_weights)}
        super().__init__(tasks_or_weights, **kwargs)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def draw_orders(self):
        """``[T, T]`` int32: row i is a random permutation of the tasks, the order task i meets the others."""
        T = len(self.names)
        return ops.cast(ops.argsort(keras.random.uniform((T, T), seed=self.seed_generator), axis=1), "int32")


def pcgrad_combine(grads, orders):
    """PCGrad's update direction (Yu et al. 2020, Algorithm 1): task gradients ``[T, P]`` -> ``[P]``.

    For each task i, start from ``g_i`` and go through the tasks j in ``orders[i]`` (``[T, T]``, each row
    a permutation of ``0 … T-1``; ``j = i`` is skipped): where ``g_i^PC · g_j < 0``, remove from
    ``g_i^PC`` its component along the *original* ``g_j``. Return ``Σ_i g_i^PC``. The same arithmetic
    as ``multitask.pcgrad_combine``, which draws each row with ``torch.randperm``; here the orders are
    an argument, so a test can give both the same ones. Graph-friendly: ``T`` must be static.
    """
    grads = tf.convert_to_tensor(grads, tf.float32)
    orders = tf.convert_to_tensor(orders, tf.int32)
    T = grads.shape[0]
    if T is None or len(grads.shape) != 2:
        raise ValueError(f"expected task gradients [T, P] with a known T, got {tuple(grads.shape)}")
    if tuple(orders.shape) != (T, T):
        raise ValueError(f"orders must be [T, T] = [{T}, {T}], got {tuple(orders.shape)}")
    sq_norms = tf.maximum(tf.reduce_sum(tf.square(grads), axis=1), 1e-20)              # [T]
    out = []
    for i in range(T):
        g = grads[i]
        for k in range(T):
            j = orders[i, k]
            g_j = tf.gather(grads, j)
            dot = tf.reduce_sum(g * g_j)
            # min(dot, 0): only a conflict is projected away; the mask skips j == i without a branch.
            coefficient = tf.minimum(dot, 0.0) / tf.gather(sq_norms, j) * tf.cast(j != i, tf.float32)
            g = g - coefficient * g_j
        out.append(g)
    return tf.add_n(out)


def make_weighting(spec, tasks, seed: int = 0) -> FixedWeights:
    """``"equal"`` -> :class:`FixedWeights` of ones, ``{task: w}`` -> :class:`FixedWeights` of those,
    ``"uncertainty"``, ``"random"``, ``"pcgrad"`` -> those layers; a layer is returned as is."""
    if isinstance(spec, FixedWeights):
        return spec
    tasks = get_tasks(tasks)
    names = [t.name for t in tasks]
    if isinstance(spec, Mapping):
        if set(spec) != set(names):
            raise ValueError(f"fixed weights for {sorted(spec)} do not match the tasks {names}")
        return FixedWeights({n: spec[n] for n in names}, name="fixed_weights")
    builders = {"equal": lambda: FixedWeights({n: 1.0 for n in names}, name="equal_weights"),
                "uncertainty": lambda: UncertaintyWeighting(tasks, name="uncertainty_weighting"),
                "random": lambda: RandomWeights(tasks, seed, name="random_weights"),
                "pcgrad": lambda: PCGrad(tasks, seed, name="pcgrad")}
    if spec not in builders:
        raise ValueError(f"unknown weighting {spec!r}; choose one of {', '.join(builders)} or pass a mapping or a layer")
    return builders[spec]()


# ----------------------------------------------------------------------------- the model


class MultiTask(keras.Model):
    """A multi-task network and its loss weighting, trained by its own ``train_step``.

    ``net``: a model ``images [B, H, W, C]`` -> ``{task: output}`` (:func:`multitask_model` or
    :func:`single_task_model`); ``weighting``: a spec or layer for :func:`make_weighting`. ``fit`` data:
    ``(images, {task: target [B]})`` batches (:func:`multitask_dataset`). Each step:

    1. one forward pass through the trunk and every head, one loss per task (:func:`task_losses`);
    2. the weighting layer registers the combined loss with ``add_loss``; the step's loss is
       ``sum(self.losses)``, everything registered in this step (and any regulariser of ``net``);
    3. gradients: of that loss for every variable, or for :class:`PCGrad` one gradient per task on
       the shared trunk (a persistent tape), combined by :func:`pcgrad_combine`, and the loss's gradient
       for the heads (each head's is its own task's), as ``multitask.pcgrad_backward``.

    ``compile(optimizer, weighting_optimizer=None)``: the weighting's own trainable variables
    (uncertainty's log-variances) are updated by ``weighting_optimizer`` when given (chapter 05 gives
    them a larger learning rate and no weight decay), else by ``optimizer``. Training metrics:
    ``loss`` (the combined loss) and ``loss_<task>`` per task. ``call`` returns ``net``'s outputs.
    """

    def __init__(self, net: keras.Model, tasks, weighting="equal", seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.tasks = get_tasks(tasks)
        names = [t.name for t in self.tasks]
        outputs = list(net.output) if isinstance(net.output, Mapping) else None
        if outputs is not None and set(names) - set(outputs):
            raise ValueError(f"the model has no output for {', '.join(sorted(set(names) - set(outputs)))} "
                             f"(outputs: {', '.join(outputs)})")
        self.weighting = make_weighting(weighting, self.tasks, seed)
        if self.weighting.names != names:
            raise ValueError(f"the weighting is for {self.weighting.names}, the tasks are {names}")
        self.pcgrad = isinstance(self.weighting, PCGrad)
        self.shared_variables, self.head_variables = shared_and_head_variables(net)
        if self.pcgrad and not self.shared_variables:
            raise ValueError("PCGrad needs shared weights: the model has no layer named 'trunk'")
        self.weighting_optimizer = None
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.task_trackers = [keras.metrics.Mean(name=f"loss_{n}") for n in names]

    def compile(self, optimizer="adam", weighting_optimizer=None, **kwargs):
        super().compile(optimizer=optimizer, **kwargs)
        own = self.weighting.trainable_variables
        self.weighting_optimizer = weighting_optimizer if own else None
        # Built here, each on the variables it updates (Keras would give the first one all of them),
        # outside the compiled step, where their slot variables may be created.
        self.optimizer.build(self.net.trainable_variables + ([] if self.weighting_optimizer else own))
        if self.weighting_optimizer is not None:
            self.weighting_optimizer.build(own)
        self._initial_state = [v.numpy() for v in self._restartable()]

    def _restartable(self):
        optimizers = [o for o in (self.optimizer, self.weighting_optimizer) if o is not None]
        return [*self.weighting.variables, *(v for o in optimizers for v in o.variables)]

    def restart(self, start: keras.Model, seed: int | None = None) -> None:
        """Train again from the beginning, keeping the compiled step.

        ``start``'s variables (a new ``net`` of the same architecture, built under the next run's seed)
        are copied into ``net``; the weighting and the optimisers return to their state after
        ``compile``; with ``seed``, the weighting's random draws (random weights, PCGrad's orders)
        restart from that seed. The next ``fit`` then reuses the step ``tf.function`` traced in the
        first one: tracing is a noticeable part of a run as short as chapter 05's quick profile on a CPU.
        """
        if not hasattr(self, "_initial_state"):
            raise RuntimeError("compile the model before restarting it")
        if [tuple(v.shape) for v in start.variables] != [tuple(v.shape) for v in self.net.variables]:
            raise ValueError(f"{start.name!r} does not have the variables of {self.net.name!r}")
        for v, value in zip(self.net.variables, start.variables):
            v.assign(value)
        for v, value in zip(self._restartable(), self._initial_state):
            v.assign(value)
        generator = getattr(self.weighting, "seed_generator", None)
        if seed is not None and generator is not None:
            generator.state.assign(keras.random.SeedGenerator(seed).state.value)

    @property
    def metrics(self):
        return [self.loss_tracker, *self.task_trackers]

    def build(self, input_shape=None):
        self.built = True          # net and weighting are built when made

    def call(self, images, training: bool = False):
        return self.net(images, training=training)

    def combine(self, losses: Mapping):
        """The step's loss: the weighting layer adds it with ``add_loss``; ``self.losses`` collects it."""
        self.weighting(losses)
        return ops.sum(self.losses)

    def _gradients(self, tape, total, losses, variables):
        if not self.pcgrad:
            return tape.gradient(total, variables)
        shared = self.shared_variables
        per_task = []
        for k, name in enumerate(self.weighting.names):
            # Scaling the upstream gradient by w_k is the gradient of w_k L_k, without recording a product.
            grads = tape.gradient(losses[name], shared, output_gradients=self.weighting.w[k])
            per_task.append(tf.concat([tf.reshape(g if g is not None else tf.zeros_like(v), [-1])
                                       for g, v in zip(grads, shared)], axis=0))
        direction = pcgrad_combine(tf.stack(per_task), self.weighting.draw_orders())      # [P]
        shared_grads, start = [], 0
        for v in shared:
            size = int(np.prod(v.shape))
            shared_grads.append(tf.reshape(direction[start:start + size], v.shape))
            start += size
        ids = {id(v) for v in shared}
        rest = [v for v in variables if id(v) not in ids]
        rest_grads = dict(zip((id(v) for v in rest), tape.gradient(total, rest)))
        by_id = {**dict(zip((id(v) for v in shared), shared_grads)), **rest_grads}
        return [by_id[id(v)] for v in variables]

    def train_step(self, data):
        images, targets = data[0], data[1]
        net_variables = self.net.trainable_variables
        own = self.weighting.trainable_variables
        with tf.GradientTape(persistent=self.pcgrad) as tape:
            outputs = self.net(images, training=True)
            losses = task_losses(outputs, targets, self.tasks)
            total = self.combine(losses)
        variables = net_variables + own
        grads = self._gradients(tape, total, losses, variables)
        if self.weighting_optimizer is None or not own:
            self.optimizer.apply_gradients(zip(grads, variables))
        else:
            n = len(net_variables)
            self.optimizer.apply_gradients(zip(grads[:n], net_variables))
            self.weighting_optimizer.apply_gradients(zip(grads[n:], own))
        del tape
        self.loss_tracker.update_state(total)
        for tracker, name in zip(self.task_trackers, self.weighting.names):
            tracker.update_state(losses[name])
        return {m.name: m.result() for m in self.metrics}


def multitask_dataset(images, targets: Mapping, batch_size: int, seed: int, epochs: int | None = None):
    """A seeded ``tf.data`` of ``(images [B, ...], {task: target [B]})`` batches.

    A new permutation every epoch, from ``seed`` (the same ``seed`` gives every arm of a comparison the
    same batches in the same order); ``drop_remainder`` so every step sees ``batch_size`` images, as
    ``multitask.train_multitask`` (``len // batch_size`` steps per epoch). ``epochs=None`` repeats forever.
    """
    n = len(images)
    if any(len(v) != n for v in targets.values()):
        raise ValueError(f"{n} images but targets of lengths {({k: len(v) for k, v in targets.items()})}")
    if n < batch_size:
        raise ValueError(f"{n} training images is less than one batch of {batch_size}")
    data = (tf.data.Dataset.from_tensor_slices((images, dict(targets)))
            .shuffle(n, seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size, drop_remainder=True))
    return data.repeat(epochs).prefetch(tf.data.AUTOTUNE)


class WeightHistory(keras.callbacks.Callback):
    """Records ``model.weighting.weight_vector()`` after every training step: ``self.history[task]``."""

    def on_train_begin(self, logs=None):
        self.history = {n: [] for n in self.model.weighting.names}

    def on_train_batch_end(self, batch, logs=None):
        for name, w in zip(self.model.weighting.names, self.model.weighting.weight_vector().tolist()):
            self.history[name].append(w)


__all__ = ["LOSSES", "Task", "TASKS", "get_tasks", "task_loss", "task_losses", "score", "evaluate",
           "digit_trunk", "multitask_model", "single_task_model", "shared_and_head_variables",
           "FixedWeights", "UncertaintyWeighting", "RandomWeights", "PCGrad", "pcgrad_combine", "make_weighting",
           "MultiTask", "multitask_dataset", "WeightHistory"]
