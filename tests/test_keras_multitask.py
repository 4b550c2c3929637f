"""The Keras companion of chapter 05 (``tlcourse.keras_multitask``) against the PyTorch chapter's ``multitask``.

Tasks, losses, the uncertainty weighting (value and gradients) and PCGrad's combination are compared with
their PyTorch versions on the same inputs; the PCGrad ``train_step`` with a hand computation on a tiny model;
the models are trained for a few steps on a few hundred MultiDigits images. Well under a minute on two cores.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import math
import warnings

import numpy as np
import pytest

if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("keras") is None:
    pytest.skip("TensorFlow and Keras 3 are not installed (pip install 'tlcourse[tensorflow]')",
                allow_module_level=True)

import torch  # noqa: E402

from tlcourse import keras_multitask as kmt  # noqa: E402 - imports TensorFlow through tlcourse._tf
from tlcourse import multitask as mt  # noqa: E402
from tlcourse._tf import keras, tf  # noqa: E402

# Keras 3.15's convert_to_numpy calls np.array(tensor, copy=False) on TensorFlow tensors (noise only).
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
              pytest.mark.filterwarnings("ignore:.*shuffle=True.*:UserWarning")]   # our tf.data shuffles itself

TASKS = ["left", "right", "sum"]


def _count(variables) -> int:
    return sum(int(np.prod(v.shape)) for v in variables)


# --- tasks and losses --------------------------------------------------------------------------


def test_module_never_imports_torch():
    tree = ast.parse(inspect.getsource(kmt))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not [name for name in imported if name.split(".")[0] == "torch"], imported
    assert "tlcourse.multitask" not in imported


def test_tasks_agree_with_pytorch():
    assert list(kmt.TASKS) == list(mt.TASKS)
    for name, task in kmt.TASKS.items():
        reference = mt.TASKS[name]
        for field in ("kind", "num_classes", "loss", "shift", "scale", "out_features"):
            assert getattr(task, field) == getattr(reference, field), (name, field)
    # PyTorch's Task objects are accepted as they are, a modified one too (chapter 05's raw sum).
    raw = kmt.get_tasks(["left", dataclasses.replace(mt.TASKS["sum"], shift=0.0, scale=1.0)])
    assert [t.name for t in raw] == ["left", "sum"] and (raw[1].shift, raw[1].scale) == (0.0, 1.0)


def test_bad_tasks_are_named():
    with pytest.raises(ValueError, match="no task named 'middle'"):
        kmt.get_tasks(["left", "middle"])
    with pytest.raises(ValueError, match="distinct"):
        kmt.get_tasks(["left", "left"])
    with pytest.raises(ValueError, match="kind"):
        kmt.Task("x", "ranking")
    with pytest.raises(ValueError, match="num_classes"):
        kmt.Task("x", "classification")
    with pytest.raises(ValueError, match="takes the loss mse or smooth_l1"):
        kmt.Task("x", "regression", loss="cross_entropy")
    with pytest.raises(ValueError, match="scale"):
        kmt.Task("x", "regression", scale=0.0)
    assert kmt.Task("x", "regression").loss == "mse" and kmt.Task("x", "classification", 3).loss == "cross_entropy"


@pytest.mark.parametrize("task", [mt.TASKS["left"], mt.TASKS["same"], mt.TASKS["sum"],
                                  dataclasses.replace(mt.TASKS["sum"], shift=0.0, scale=1.0),
                                  dataclasses.replace(mt.TASKS["sum"], loss="smooth_l1")],
                         ids=["left", "same", "sum", "raw sum", "sum smooth_l1"])
def test_task_loss_equals_pytorch(task):
    rng = np.random.default_rng(len(task.name) + int(task.scale))
    batch = 64
    if task.kind == "classification":
        output = (rng.normal(size=(batch, task.num_classes)) * 3).astype("float32")
        target = rng.integers(0, task.num_classes, batch)
    else:
        output = rng.normal(size=batch).astype("float32")
        target = rng.integers(0, 19, batch).astype("float32")
    keras_value = float(kmt.task_loss(kmt.get_tasks(task)[0], output, target))
    torch_value = float(task.compute_loss(torch.from_numpy(output), torch.from_numpy(target)))
    assert abs(keras_value - torch_value) <= 1e-5 * max(1.0, abs(torch_value)), (keras_value, torch_value)
    # ... and the metric, on the same outputs.
    assert kmt.score(kmt.get_tasks(task)[0], output, target) == pytest.approx(
        task.score(torch.from_numpy(output), torch.from_numpy(target)), abs=1e-6)


def test_mismatched_shapes_give_clear_errors():
    left, total = kmt.TASKS["left"], kmt.TASKS["sum"]
    with pytest.raises(ValueError, match=r"expected logits \[B, 10\]"):
        kmt.task_loss(left, np.zeros((4, 3), "float32"), np.zeros(4))
    with pytest.raises(ValueError, match=r"expected predictions \[B\]"):
        kmt.task_loss(total, np.zeros((4, 1), "float32"), np.zeros(4))
    with pytest.raises(KeyError, match="sum"):
        kmt.task_losses({"left": np.zeros((4, 10), "float32")}, {"left": np.zeros(4)}, kmt.get_tasks(["left", "sum"]))


# --- loss weightings ---------------------------------------------------------------------------


def _losses(values):
    return {name: tf.constant(v, tf.float32) for name, v in zip(TASKS, values)}


def test_fixed_weights_equal_pytorch_and_live_in_add_loss():
    weights = {"left": 1.0, "right": 0.3, "sum": 0.5}
    layer = kmt.FixedWeights(weights)
    losses = _losses([2.3, 1.7, 0.4])
    returned = layer(losses)
    expected = float(mt.FixedWeights(weights)({n: torch.tensor(float(v)) for n, v in losses.items()}))
    # The layer's output is the losses, unchanged; the combined loss is only in layer.losses.
    assert {n: float(v) for n, v in returned.items()} == pytest.approx({n: float(v) for n, v in losses.items()})
    assert len(layer.losses) == 1 and float(layer.losses[0]) == pytest.approx(expected, abs=1e-6)
    layer(losses)
    assert len(layer.losses) == 1                                # cleared at every call, not piled up
    with pytest.raises(KeyError, match="sum"):
        layer({"left": losses["left"], "right": losses["right"]})


@pytest.mark.parametrize("init", [0.0, 0.7])
def test_uncertainty_weighting_value_and_gradients_equal_pytorch(init):
    rng = np.random.default_rng(5)
    tasks = ["left", "sum", "right"]                            # a regression task between two others
    values = rng.uniform(0.2, 3.0, 3).astype("float32")
    log_vars = (rng.normal(size=3) * 0.8 + init).astype("float32")

    layer = kmt.UncertaintyWeighting(tasks, init=init)
    assert np.allclose(layer.log_vars.numpy(), init)
    layer.log_vars.assign(log_vars)
    loss_vars = [tf.Variable(v) for v in values]
    with tf.GradientTape() as tape:
        layer({n: v for n, v in zip(tasks, loss_vars)})
        keras_value = tf.add_n(layer.losses)
    keras_grads = tape.gradient(keras_value, [layer.log_vars, *loss_vars])

    reference = mt.UncertaintyWeighting(tasks, init=init)
    with torch.no_grad():
        reference.log_vars.copy_(torch.from_numpy(log_vars))
    torch_losses = [torch.tensor(float(v), requires_grad=True) for v in values]
    total = reference(dict(zip(tasks, torch_losses)))
    total.backward()
    torch_value = float(total.detach())

    assert abs(float(keras_value) - torch_value) <= 1e-5 * max(1.0, abs(torch_value))
    np.testing.assert_allclose(keras_grads[0].numpy(), reference.log_vars.grad.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose([float(g) for g in keras_grads[1:]], [float(t.grad) for t in torch_losses],
                               atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(layer.weight_vector(), reference.weight_vector().numpy(), rtol=1e-6)
    assert layer.names == reference.names and layer.trainable_variables == [layer.log_vars]


def test_uncertainty_gradient_vanishes_at_the_optimal_log_variance():
    layer = kmt.UncertaintyWeighting(["left", "sum"])
    losses = {"left": 1.3, "sum": 0.6}
    layer.log_vars.assign([mt.UncertaintyWeighting.optimal_log_var(losses["left"], "classification"),
                           mt.UncertaintyWeighting.optimal_log_var(losses["sum"], "regression")])
    with tf.GradientTape() as tape:
        layer({n: tf.constant(v) for n, v in losses.items()})
        total = tf.add_n(layer.losses)
    np.testing.assert_allclose(tape.gradient(total, layer.log_vars).numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(layer.weight_vector(), [1 / (2 * 1.3), 1 / (2 * 0.6)], rtol=1e-6)


def test_random_weights_are_seeded_sum_to_T_and_change_inside_a_compiled_step():
    def draws(seed, n=4):
        layer = kmt.RandomWeights(TASKS, seed=seed)
        step = tf.function(lambda losses: layer(losses))
        out = []
        for _ in range(n):
            step(_losses([1.0, 1.0, 1.0]))
            out.append(layer.weight_vector().copy())
        return np.array(out)

    a, b, c = draws(3), draws(3), draws(4)
    np.testing.assert_allclose(a.sum(axis=1), 3.0, rtol=1e-6)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], a[1]) and not np.allclose(a, c)


# --- PCGrad ------------------------------------------------------------------------------------


def _torch_orders(T, seed):
    """The orders multitask.pcgrad_combine draws with this generator: one randperm per task, in turn."""
    generator = torch.Generator().manual_seed(seed)
    return np.stack([torch.randperm(T, generator=generator).numpy() for _ in range(T)])


@pytest.mark.parametrize("T, P, seed", [(2, 7, 0), (3, 50, 1), (3, 50, 2), (4, 20, 3), (5, 9, 4)])
def test_pcgrad_combine_equals_pytorch(T, P, seed):
    rng = np.random.default_rng(seed)
    grads = rng.normal(size=(T, P)).astype("float32")
    grads[1] -= 1.5 * grads[0]                                 # at least one strong conflict
    expected = mt.pcgrad_combine(torch.from_numpy(grads), torch.Generator().manual_seed(seed)).numpy()
    result = kmt.pcgrad_combine(grads, _torch_orders(T, seed)).numpy()
    np.testing.assert_allclose(result, expected, atol=1e-5, rtol=1e-5)
    # Compiled, with orders drawn inside the graph (as train_step does): still a valid combination.
    layer = kmt.PCGrad(kmt.get_tasks(["left", "right", "sum", "same"][:T]) if T <= 4 else
                       {f"t{i}": 1.0 for i in range(T)}, seed=seed)
    orders = layer.draw_orders().numpy()
    assert all(sorted(row) == list(range(T)) for row in orders)
    compiled = tf.function(kmt.pcgrad_combine)(grads, orders).numpy()
    reference = kmt.pcgrad_combine(grads, orders).numpy()
    np.testing.assert_allclose(compiled, reference, atol=1e-6)


def test_pcgrad_removes_a_conflict_and_leaves_agreement_alone():
    g1, g2 = np.array([1.0, 0.0], "float32"), np.array([-1.0, 1.0], "float32")     # g1 · g2 = -1 < 0
    direction = kmt.pcgrad_combine(np.stack([g1, g2]), [[0, 1], [1, 0]]).numpy()
    # g1 projected onto g2's normal plane: g1 - (g1·g2/|g2|²) g2 = [0.5, 0.5]; g2 onto g1's: [0, 1].
    np.testing.assert_allclose(direction, [0.5, 1.5], atol=1e-7)
    assert direction @ g1 >= 0 and direction @ g2 >= 0           # neither task's loss goes up (first order)
    assert (g1 + g2) @ g1 == 0.0                                 # the plain sum stalls the first task
    agree = np.array([[1.0, 2.0], [0.5, 0.1]], "float32")
    np.testing.assert_allclose(kmt.pcgrad_combine(agree, [[0, 1], [0, 1]]).numpy(), agree.sum(0), atol=1e-7)


def test_pcgrad_combine_bad_shapes():
    with pytest.raises(ValueError, match="orders"):
        kmt.pcgrad_combine(np.zeros((3, 4), "float32"), [[0, 1], [1, 0]])
    with pytest.raises(ValueError, match=r"\[T, P\]"):
        kmt.pcgrad_combine(np.zeros(4, "float32"), [[0]])


def _tiny_net(seed=0):
    """A trunk (one dense layer, named "trunk") and two heads: opposite regression targets below conflict."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    trunk = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)], name="trunk")
    features = trunk(inputs)
    outputs = {name: keras.ops.squeeze(keras.layers.Dense(1, name=name)(features), -1) for name in ("up", "down")}
    return keras.Model(inputs, outputs)


def test_pcgrad_train_step_updates_the_trunk_by_the_projected_sum():
    tasks = [kmt.Task("up", "regression"), kmt.Task("down", "regression")]
    net = _tiny_net()
    net.get_layer("down").set_weights(net.get_layer("up").get_weights())     # the same head: exact opposites
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.uniform(2, 3, 8).astype("float32")
    targets = {"up": y, "down": -y}
    before = [v.numpy().copy() for v in net.trainable_variables]

    # By hand: one tape per task, PCGrad on the flattened trunk gradients, each head its own gradient.
    shared, heads = kmt.shared_and_head_variables(net)
    per_task, head_grads = [], {}
    for task in tasks:
        with tf.GradientTape() as tape:
            loss = kmt.task_loss(task, net(x, training=True)[task.name], targets[task.name])
        grads = tape.gradient(loss, shared + heads)
        per_task.append(np.concatenate([g.numpy().ravel() for g in grads[:len(shared)]]))
        head_grads.update({id(v): g for v, g in zip(heads, grads[len(shared):]) if g is not None})
    assert per_task[0] @ per_task[1] < 0                                  # the case PCGrad is for
    g0, g1 = per_task
    expected = (g0 - (g0 @ g1) / (g1 @ g1) * g1) + (g1 - (g1 @ g0) / (g0 @ g0) * g0)

    lr = 0.1
    model = kmt.MultiTask(net, tasks, "pcgrad")
    model.compile(keras.optimizers.SGD(lr))
    model.fit(tf.data.Dataset.from_tensors((x, targets)), epochs=1, verbose=0)
    shared_ids = {id(v) for v in shared}
    steps = {id(v): (b - v.numpy()) / lr for v, b in zip(net.trainable_variables, before)}
    shared_step = np.concatenate([steps[id(v)].ravel() for v in shared])
    np.testing.assert_allclose(shared_step, expected, atol=1e-5, rtol=1e-4)
    assert not np.allclose(shared_step, g0 + g1, atol=1e-3)               # the projection changed something
    for v in net.trainable_variables:
        if id(v) not in shared_ids:
            np.testing.assert_allclose(steps[id(v)], head_grads[id(v)].numpy(), atol=1e-5, rtol=1e-4)


# --- models --------------------------------------------------------------------------------------


def test_models_match_the_pytorch_ones():
    net = kmt.multitask_model(TASKS)
    assert _count(net.trainable_variables) == sum(p.numel() for p in mt.multitask_net(TASKS).parameters())
    singles = kmt.single_task_model(TASKS)
    assert _count(singles.trainable_variables) == sum(
        sum(p.numel() for p in m.parameters()) for m in mt.single_task(TASKS).values())
    out = net(np.zeros((2, 28, 28, 1), "float32"))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"left": (2, 10), "right": (2, 10), "sum": (2,)}
    shared, heads = kmt.shared_and_head_variables(net)
    assert _count(shared) == sum(p.numel() for p in mt.digit_backbone().parameters())
    assert _count(heads) == 2 * (128 * 10 + 10) + 129
    assert kmt.shared_and_head_variables(singles)[0] == []


def test_kernels_follow_the_seed():
    def kernels(seed):
        keras.utils.set_random_seed(seed)
        return [v.numpy() for v in kmt.digit_trunk().trainable_variables if "kernel" in v.path]

    a, b, c = kernels(0), kernels(0), kernels(1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not any(np.array_equal(x, y) for x, y in zip(a, c))
    # PyTorch's bound: uniform in +-1/sqrt(fan_in) (variance 1/(3 fan_in)).
    assert np.abs(a[0]).max() <= 1 / math.sqrt(25) and np.abs(a[0]).max() > 0.9 / math.sqrt(25)
    # The single-task baseline's three trunks start from different weights, not copies.
    keras.utils.set_random_seed(0)
    singles = kmt.single_task_model(TASKS)
    first = [singles.get_layer(f"trunk_{t}").trainable_variables[0].numpy() for t in TASKS]
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[1], first[2])


def test_single_task_networks_share_nothing():
    singles = kmt.single_task_model(TASKS)
    x = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    with tf.GradientTape(persistent=True) as tape:
        out = singles(x, training=True)
        losses = kmt.task_losses(out, {"left": np.arange(4), "right": np.arange(4), "sum": np.arange(4.0)},
                                 kmt.get_tasks(TASKS))
    for t in TASKS:
        for other in TASKS:
            grads = tape.gradient(losses[t], singles.get_layer(f"trunk_{other}").trainable_variables)
            assert all(g is None for g in grads) == (t != other), (t, other)


# --- training ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_data():
    data = mt.multi_digits(256, seed=0, split="train")
    images = data.images.permute(0, 2, 3, 1).contiguous().numpy()
    return images, {t: data.targets[t].numpy() for t in TASKS}


def _trained(net, weighting, data, epochs=3, seed=0, cls=kmt.MultiTask, weighting_lr=1e-2):
    model = cls(net, TASKS, weighting, seed=seed)
    model.compile(keras.optimizers.AdamW(2e-3, weight_decay=1e-4, epsilon=1e-8),
                  weighting_optimizer=keras.optimizers.Adam(weighting_lr))
    images, targets = data
    history = model.fit(kmt.multitask_dataset(images, targets, 64, seed), epochs=epochs, steps_per_epoch=4,
                        verbose=0)
    return model, history


def test_fit_reduces_the_losses_and_learns_uncertainty_weights(small_data):
    keras.utils.set_random_seed(0)
    model, history = _trained(kmt.multitask_model(TASKS), "uncertainty", small_data)
    losses = history.history
    for key in ("loss", "loss_left", "loss_right", "loss_sum"):
        assert losses[key][-1] < losses[key][0], (key, losses[key])
    log_vars = model.weighting.log_vars.numpy()
    assert np.all(log_vars != 0.0)
    metrics = kmt.evaluate(model, *small_data, TASKS)
    assert set(metrics) == set(TASKS) and all(0 <= metrics[t] <= 1 for t in ("left", "right"))


def test_weight_history_records_every_step(small_data):
    keras.utils.set_random_seed(0)
    callback = kmt.WeightHistory()
    model = kmt.MultiTask(kmt.multitask_model(TASKS), TASKS, "uncertainty")
    model.compile(keras.optimizers.Adam(1e-3), weighting_optimizer=keras.optimizers.Adam(1e-1))
    model.fit(kmt.multitask_dataset(*small_data, 64, 0), epochs=2, steps_per_epoch=3, verbose=0, callbacks=[callback])
    assert {t: len(v) for t, v in callback.history.items()} == {t: 6 for t in TASKS}
    np.testing.assert_allclose([callback.history[t][-1] for t in TASKS], model.weighting.weight_vector(), rtol=1e-6)
    assert callback.history["sum"][0] != 0.5                   # recorded after the first step, not before


def test_forgetting_self_losses_leaves_the_log_variances_untrained(small_data):
    class Forgetful(kmt.MultiTask):
        def combine(self, losses):
            return keras.ops.sum(list(self.weighting(losses).values()))    # the layer's output: unweighted

    keras.utils.set_random_seed(0)
    net = kmt.multitask_model(TASKS)
    model = Forgetful(net, TASKS, "uncertainty")
    model.compile(keras.optimizers.AdamW(2e-3))               # one optimiser for all, as most Keras code
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(kmt.multitask_dataset(*small_data, 64, 0), epochs=1, steps_per_epoch=3, verbose=0)
    assert np.all(model.weighting.log_vars.numpy() == 0.0)
    assert any("Gradients do not exist" in str(w.message) for w in caught)
    images, targets = small_data
    with tf.GradientTape() as tape:
        losses = kmt.task_losses(model(images[:8], training=True), {t: v[:8] for t, v in targets.items()}, model.tasks)
        model.combine(losses)
        registered = model.losses                               # the loss was there, unused
    assert len(registered) == 1 and tape.gradient(registered[0], model.weighting.log_vars) is not None


def test_restart_equals_a_fresh_model(small_data):
    def run(model):
        model.fit(kmt.multitask_dataset(*small_data, 64, 1), epochs=2, steps_per_epoch=2, verbose=0)
        return [v.numpy() for v in model.net.variables] + [model.weighting.log_vars.numpy()]

    def compiled(net):
        model = kmt.MultiTask(net, TASKS, "uncertainty", seed=1)
        model.compile(keras.optimizers.AdamW(2e-3), weighting_optimizer=keras.optimizers.Adam(1e-2))
        return model

    keras.utils.set_random_seed(0)
    reused = compiled(kmt.multitask_model(TASKS))
    run(reused)
    keras.utils.set_random_seed(1)
    start = kmt.multitask_model(TASKS)
    keras.utils.set_random_seed(1)
    fresh = compiled(kmt.multitask_model(TASKS))
    reused.restart(start, seed=1)
    for a, b in zip(run(reused), run(fresh)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="variables"):
        reused.restart(kmt.single_task_model(TASKS))


def test_bad_arguments():
    net = kmt.multitask_model(["left", "sum"])
    with pytest.raises(ValueError, match="no output for right"):
        kmt.MultiTask(net, ["left", "right"])
    with pytest.raises(ValueError, match="unknown weighting 'gradnorm'"):
        kmt.MultiTask(net, ["left", "sum"], "gradnorm")
    with pytest.raises(ValueError, match="do not match"):
        kmt.MultiTask(net, ["left", "sum"], {"left": 1.0})
    with pytest.raises(ValueError, match="PCGrad needs shared weights"):
        kmt.MultiTask(kmt.single_task_model(["left", "sum"]), ["left", "sum"], "pcgrad")
    with pytest.raises(RuntimeError, match="compile"):
        kmt.MultiTask(net, ["left", "sum"]).restart(net)


def test_multitask_dataset_is_seeded_and_checks_lengths():
    images = np.arange(40, dtype="float32").reshape(20, 2)
    targets = {"left": np.arange(20), "sum": np.arange(20, dtype="float32") * 2}
    first = list(kmt.multitask_dataset(images, targets, 4, seed=7, epochs=2))
    again = list(kmt.multitask_dataset(images, targets, 4, seed=7, epochs=2))
    assert len(first) == 10
    for (x1, y1), (x2, y2) in zip(first, again):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(x1.numpy()[:, 0] / 2, y1["left"].numpy())    # targets travel with images
        np.testing.assert_array_equal(y1["sum"].numpy(), 2 * y1["left"].numpy())
    assert not np.array_equal(first[0][0], first[5][0])       # a new order every epoch
    with pytest.raises(ValueError, match="lengths"):
        kmt.multitask_dataset(images, {"left": np.arange(19)}, 4, seed=0)
    with pytest.raises(ValueError, match="less than one batch"):
        kmt.multitask_dataset(images, targets, 64, seed=0)
