"""Chapter 04 and its Keras companion, crossed: whose transfer set, whose student.

Chapter 04 (PyTorch) and 04 K (Keras) distil the same teacher recipe into the same student with the
same loss, but each builds its own transfer set: a teacher fine-tuned by its framework, and views cut
by its framework's crop sampler. When their verdicts differ, three things could be the cause: the
views, the teacher, or the student's framework. :func:`crossing` separates them. For every course seed
it builds both transfer sets (as the two notebooks build them, with ``seed`` as the course seed), lets
each teacher also label the other's views, and trains both students, from scratch (α = 0) and
distilled, on every combination: 4 transfer sets × 2 students, paired by seed. ``tlcourse bench kd``
runs it and prints :func:`summary_markdown`.

Needs the ``tensorflow`` extra (``pip install 'tlcourse[tensorflow]'``). Each seed costs ~4 minutes on one
CPU thread at the ``quick`` settings (two teachers ~25 s each, 12 student runs of 10-20 s).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable

import numpy as np
import torch

from tlcourse import adapt, datasets, distill, env, finetune, models, train

# (views, teacher) of each transfer set: "torch" = built as chapter 04 builds it, "keras" = as 04 K.
SETS = (("torch", "torch"), ("keras", "keras"), ("torch", "keras"), ("keras", "torch"))
STUDENTS = ("torch", "keras")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The two notebooks' ``quick`` settings (chapter 04's sections 3-7, 04 K's sections 1-5)."""
    teacher_size: int = 128
    student_size: int = 64
    views: int = 6
    epochs: int = 12            # student epochs over the transfer set
    teacher_epochs: int = 4
    temperature: float = 4.0
    alpha: float = 0.9
    lr: float = 3e-3


def load_data(size: int, seed: int = 0, download: bool = True) -> tuple[str, tuple, tuple]:
    """Hymenoptera decoded for both frameworks, or the bundled faces when it is not available.

    Returns ``(name, (torch_train, torch_val), (keras_train, keras_val))``: ``finetune.PreDecoded``
    and ``keras_data.Decoded``, each decoded the way its notebook decodes it. The faces' train/val
    split follows the course ``seed``, as in the notebooks; hymenoptera's split is fixed.
    """
    from tlcourse import keras_data

    side = finetune.short_side_for(size)
    try:
        sources = datasets.hymenoptera("train", download=download), datasets.hymenoptera("val", download=download)
        name = "hymenoptera"
        torch_data = tuple(finetune.PreDecoded.from_folder(s, side) for s in sources)
    except datasets.DatasetUnavailable:
        sources = datasets.lfw_faces("train", seed=seed), datasets.lfw_faces("val", seed=seed)
        name = "lfw_faces"
        torch_data = tuple(finetune.PreDecoded.from_dataset(s, side) for s in sources)
    keras_decoded = tuple(keras_data.decode_images(s, side, progress=False) for s in sources)
    return name, torch_data, keras_decoded


def _torch_teacher(train_raw, val_raw, seed: int, s: Settings, device):
    """Chapter 04's teacher (section 3): EfficientNet-Lite0, last two groups, layer-wise decay, warm-up.

    Returns ``(label, val_acc, (mean, std))``: ``label(views)`` maps ``uint8 [N, S, S, 3]`` NumPy views
    to ``float32 [N, C]`` logits.
    """
    mean, std = models.normalization(models.efficientnet_lite0())
    train_loader = train.make_loader(train_raw.with_transform(finetune.train_transform(s.teacher_size, mean, std)),
                                     batch_size=16, shuffle=True, device=device)
    val_loader = train.make_loader(val_raw.with_transform(finetune.eval_transform(s.teacher_size, mean, std)),
                                   batch_size=64, device=device)
    recipe = finetune.Strategy("last 2 groups", blocks=2, lr=5e-4, layer_decay=0.5, epochs=s.teacher_epochs,
                               warmup=0.2)
    result = finetune.run_strategy(lambda: models.efficientnet_lite0(num_classes=len(train_raw.classes)), recipe,
                                   train_loader, val_loader, device=device, seed=seed, progress=False)
    teacher = finetune.freeze(result.model).eval()

    def label(views_nhwc: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(views_nhwc).permute(0, 3, 1, 2).contiguous()
        return distill.teacher_logits(teacher, x, transform=lambda v: distill.to_input(v, s.teacher_size, mean, std),
                                      device=device).numpy()

    return label, result.val_acc, (mean, std)


def _keras_teacher(train_data, val_ds, seed: int, s: Settings):
    """04 K's teacher (section 1): the same recipe through ``keras_finetune.fine_tune``.

    Returns ``(label, val_acc)``, ``label`` as in :func:`_torch_teacher`.
    """
    from tlcourse import keras_data, keras_finetune, keras_models
    from tlcourse._tf import keras, tf

    def batches(epoch):
        x, y = keras_data.augmented_views(train_data, 1, s.teacher_size, seed=seed * 1000 + epoch + 1)
        return tf.data.Dataset.from_tensor_slices((x.astype("float32"), y)).shuffle(len(x), seed=seed + epoch).batch(16)

    teacher, base = keras_models.classifier(len(train_data.classes), seed=seed)
    keras_finetune.fine_tune(teacher, base, batches, s.teacher_epochs, steps_per_epoch=-(-len(train_data) // 16),
                             blocks=2, lr=5e-4, layer_decay=0.5, warmup=0.2, weight_decay=0.01)
    teacher.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    accuracy = teacher.evaluate(val_ds, verbose=0, return_dict=True)["accuracy"]
    return (lambda views_nhwc: teacher.predict(views_nhwc, batch_size=128, verbose=0)), accuracy


def _torch_student(views, logits, labels, alpha, seed, s: Settings, norm, val, device) -> float:
    """Chapter 04's student run (section 7): ``distill.StudentCNN`` through ``distill.distill``.

    ``views uint8 [N, S, S, 3]``, ``logits float32 [N, C]``, ``labels int [N]`` (NumPy); resized to the
    student's size and normalised with the teacher's ``norm`` as chapter 04 does. Returns the accuracy
    on ``val`` (``(inputs [M, 3, s, s], labels [M])``).
    """
    x = distill.to_input(torch.from_numpy(views).permute(0, 3, 1, 2).contiguous(), s.student_size, *norm)
    env.seed_everything(seed)
    student = distill.StudentCNN(num_classes=int(logits.shape[1]), width=16)
    run = distill.distill(student, x, torch.from_numpy(labels).long(), cached_logits=torch.from_numpy(logits).float(),
                          temperature=s.temperature, alpha=alpha, epochs=s.epochs, lr=s.lr, seed=seed, device=device)
    return adapt.accuracy(run.student.cpu(), val)


def _keras_student(views, logits, labels, alpha, seed, s: Settings, val_ds) -> float:
    """04 K's student run (section 5): ``keras_distill.student_cnn`` in a ``Distiller``.

    The same arrays as :func:`_torch_student`; the student resizes and rescales inside the model.
    Returns the accuracy on ``val_ds`` (04 K's centre crops).
    """
    from tlcourse import keras_distill
    from tlcourse._tf import keras, tf

    keras.utils.set_random_seed(seed)
    distiller = keras_distill.Distiller(keras_distill.student_cnn(int(logits.shape[1]), s.student_size),
                                        temperature=s.temperature, alpha=alpha)
    ds = tf.data.Dataset.from_tensor_slices(((views, logits), labels)).shuffle(len(views), seed=seed).batch(64)
    schedule = keras.optimizers.schedules.CosineDecay(s.lr, s.epochs * int(ds.cardinality()))
    distiller.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4, epsilon=1e-8))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*shuffle=True.*")   # the dataset above shuffles itself
        distiller.fit(ds, epochs=s.epochs, verbose=0)
    return float(distiller.evaluate(val_ds, verbose=0, return_dict=True)["accuracy"])


def one_seed(seed: int, data, s: Settings = Settings(), device=None, log: Callable[[str], None] = print) -> dict:
    """Both transfer sets of course seed ``seed``, and the 12 student runs on them (4 from scratch, 8 distilled).

    ``data`` is :func:`load_data`'s result. Returns ``{"seed", "teacher_acc": {"torch", "keras"},
    "agree": {"views/teacher": share of views whose teacher argmax is the label}, "runs": [{"views",
    "teacher", "student", "arm", "acc"}]}``. A scratch run (α = 0) ignores the logits, so it is trained
    once per (views, student) and paired with both teachers' distilled runs on those views. Students
    are scored on their own notebook's validation crops (the centre ``teacher_size`` crop). Every
    student run is seeded with the course seed itself: the notebooks' first student seed
    (``cfg.seeds(n)[0] = seed * n``) only for seed 0, so seed 0's runs are the notebooks' first pair.
    """
    import torchvision.transforms.v2.functional as TF

    from tlcourse import keras_data

    device = env.device(device)
    start = time.perf_counter()
    env.seed_everything(seed)
    _, (train_raw, val_raw), (train_data, val_data) = data
    torch_label, torch_acc, norm = _torch_teacher(train_raw, val_raw, seed, s, device)
    val_ds = keras_data.pipeline(val_data, s.teacher_size, 64)
    keras_label, keras_acc = _keras_teacher(train_data, val_ds, seed, s)
    views = {"torch": distill.augmented_views(train_raw.images, train_raw.labels, s.views, s.teacher_size, seed=seed),
             "keras": keras_data.augmented_views(train_data, s.views, s.teacher_size, seed=seed)}
    views = {"torch": (views["torch"][0].permute(0, 2, 3, 1).contiguous().numpy(), views["torch"][1].numpy()),
             "keras": views["keras"]}                       # both uint8 [N * views, S, S, 3], labels [N * views]
    label = {"torch": torch_label, "keras": keras_label}
    logits = {(v, t): label[t](views[v][0]) for v, t in SETS}
    crops = torch.stack([TF.center_crop(x, [s.teacher_size, s.teacher_size]) for x in val_raw.images])
    torch_val = (distill.to_input(crops, s.student_size, *norm), torch.tensor(val_raw.labels))
    out = {"seed": seed, "teacher_acc": {"torch": float(torch_acc), "keras": float(keras_acc)},
           "agree": {f"{v}/{t}": float((logits[v, t].argmax(1) == views[v][1]).mean()) for v, t in SETS}, "runs": []}
    log(f"seed {seed}: teachers torch {torch_acc:.3f}, keras {keras_acc:.3f} ({time.perf_counter() - start:.0f} s)")
    for student in STUDENTS:
        for v, t in SETS:
            for arm, alpha in (("scratch", 0.0), ("distilled", s.alpha)):
                if arm == "scratch" and v != t:
                    continue    # the same run as on (v, v): alpha = 0 never reads the logits
                x, y = views[v]
                acc = (_torch_student(x, logits[v, t], y, alpha, seed, s, norm, torch_val, device) if student == "torch"
                       else _keras_student(x, logits[v, t], y, alpha, seed, s, val_ds))
                out["runs"].append({"views": v, "teacher": t, "student": student, "arm": arm, "acc": acc})
                log(f"seed {seed}: {v} views, {t} teacher, {student} student, {arm}: {acc:.3f} "
                    f"({time.perf_counter() - start:.0f} s)")
    return out


def summary(results: list[dict]) -> list[dict]:
    """One row per (student, views, teacher): scratch and distilled means, the paired gain with its
    standard error over the seeds, wins (distilled above scratch) and ties."""
    rows = []
    for student in STUDENTS:
        for v, t in SETS:
            pairs = []
            for r in results:
                acc = {(x["views"], x["teacher"], x["arm"]): x["acc"] for x in r["runs"] if x["student"] == student}
                pairs.append((acc[v, v, "scratch"], acc[v, t, "distilled"]))
            scratch, distilled = np.array(pairs).T
            gain = distilled - scratch
            se = float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else float("nan")
            rows.append({"student": student, "views": v, "teacher": t, "seeds": len(gain),
                         "scratch": float(scratch.mean()), "distilled": float(distilled.mean()),
                         "gain": float(gain.mean()), "gain_se": se,
                         "wins": int((gain > 0).sum()), "ties": int((gain == 0).sum())})
    return rows


def summary_markdown(rows: list[dict]) -> str:
    lines = ["| student | views | teacher | seeds | scratch | distilled | gain ± SE | wins (ties) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['student']} | {r['views']} | {r['teacher']} | {r['seeds']} | {r['scratch']:.3f} | "
                     f"{r['distilled']:.3f} | {r['gain']:+.3f} ± {r['gain_se']:.3f} | {r['wins']} ({r['ties']}) |")
    return "\n".join(lines)


def crossing(seeds, s: Settings = Settings(), device=None, log: Callable[[str], None] = print,
             download: bool = True) -> dict:
    """:func:`one_seed` for every seed, and the :func:`summary`. ``device`` is PyTorch's; TensorFlow
    picks its own."""
    seeds = list(seeds)
    data = load_data(s.teacher_size, seeds[0], download)
    log(f"data: {data[0]}; settings: {s}")
    results = []
    for seed in seeds:
        if data[0] != "hymenoptera" and seed != seeds[0]:
            data = load_data(s.teacher_size, seed, download)   # the fallback's split follows the seed
        results.append(one_seed(seed, data, s, device, log))
    return {"data": data[0], "settings": dataclasses.asdict(s), "seeds": list(seeds), "results": results,
            "summary": summary(results)}
