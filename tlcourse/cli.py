"""The ``tlcourse`` command line: ``tlcourse COMMAND --help`` explains each command.

Heavy imports (torch, timm, nbconvert) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_env(args) -> int:
    from tlcourse import datasets, env

    info = env.report()
    if args.json:
        info["data_dir"] = str(datasets.data_dir())
        info["datasets"] = {s.name: s.state for s in datasets.status_all()}
        print(json.dumps(info, indent=2))
        return 0
    print("tlcourse environment")
    for key in ("python", "platform", "tlcourse", "torch", "torchvision", "timm", "scikit-learn", "tensorflow"):
        print(f"  {key:<13} {info[key]}")
    print(f"  {'device':<13} {info['device']}")
    print(f"  {'profile':<13} {info['profile']}  [{info['profile_source']}]")
    print(f"  {'seed':<13} {info['seed']}  [TLCOURSE_SEED; every notebook's claims hold for any seed]")
    if info["profile"] == "quick" and not info["cuda_available"]:
        print("                no CUDA GPU here, so notebooks run small 'quick' experiments (minutes on a CPU);")
        print("                set TLCOURSE_PROFILE=full to force the complete datasets and schedules.")
    _print_data_status(datasets)
    return 0


def _print_data_status(datasets) -> None:
    print(f"  {'data dir':<13} {datasets.data_dir()}  [TLCOURSE_DATA to change]")
    statuses = datasets.status_all()
    for status in statuses:
        print(f"    {status.name:<14} {status.state:<8} {status.message}")
    print("  " + _data_summary(statuses))


def _data_summary(statuses) -> str:
    counts = {}
    for status in statuses:
        counts[status.state] = counts.get(status.state, 0) + 1
    line = "In short: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) + "."
    if counts.get("missing"):
        line += (" Missing datasets download on first use when online (or `tlcourse data fetch NAME`);"
                 " offline, notebooks fall back to the bundled ones.")
    if counts.get("corrupt"):
        line += " Corrupt copies are never used: `tlcourse data fetch NAME` replaces them."
    return line


def _cmd_data(args) -> int:
    from tlcourse import datasets

    if args.action == "list":
        for name, info in datasets.DATASETS.items():
            print(f"{name:<14} {info.kind:<11} {info.description}")
            print(f"{'':<26} {info.citation}")
        return 0
    if args.action == "verify":
        names = args.names or list(datasets.DATASETS)
        print(f"data dir: {datasets.data_dir()}")
        try:
            statuses = [datasets.verify(name) for name in names]
        except ValueError as exc:  # an unknown name: the message lists the known ones
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for status in statuses:
            print(f"  {status.name:<14} {status.state:<8} {status.message}")
        print(_data_summary(statuses))
        return 1 if any(s.state == "corrupt" for s in statuses) else 0
    if not args.names:
        print("tlcourse data fetch: name at least one dataset (tlcourse data list shows them)", file=sys.stderr)
        return 2
    code = 0
    for name in args.names:
        try:
            path = datasets.fetch(name)
            print(f"{name}: ready in {path}")
        except Exception as exc:  # noqa: BLE001 - report and go on with the next name
            print(f"{name}: {exc}", file=sys.stderr)
            code = 1
    return code


def _cmd_predict(args) -> int:
    if args.top < 1:
        print(f"error: --top must be at least 1, not {args.top}", file=sys.stderr)
        return 2
    if args.model:
        from tlcourse import text

        if text.is_text_classifier(args.model):
            return _predict_texts(args)

    from PIL import Image, UnidentifiedImageError

    from tlcourse import models

    if args.model:  # a bad model file is one clear error before any image is read
        try:
            model, classes, transform = models.load_classifier(args.model)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    images, names, failed = [], [], []
    for name in args.images:
        try:
            with Image.open(name) as img:
                images.append(img.convert("RGB"))
            names.append(name)
        except FileNotFoundError:
            failed.append((name, "no such file"))
        except (UnidentifiedImageError, OSError) as exc:
            failed.append((name, f"not a readable image ({exc.__class__.__name__}: {exc})"))
    for name, why in failed:
        print(f"error: {name}: {why}", file=sys.stderr)
    results = {}
    if images:
        if not args.model:
            model, classes = models.efficientnet_lite0(), None
            transform = models.preprocess(model)
        for start in range(0, len(images), 32):
            chunk = images[start:start + 32]
            preds = models.predict_images(model, chunk, k=args.top, transform=transform, classes=classes)
            results.update(zip(names[start:start + 32], preds))
    return _print_predictions(results, failed, args.json)


def _predict_texts(args) -> int:
    """``predict --model`` with a model from ``probe TRAIN.csv --out``: each argument is a text."""
    import torch

    from tlcourse import models, text

    try:
        head, classes, encoder = text.load_classifier(args.model)
    except (FileNotFoundError, ValueError, text.EncoderUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    texts = [t for t in args.images if t.strip()]
    failed = [(t, "empty text") for t in args.images if not t.strip()]
    for t in texts:
        # Someone used to image models may pass a file of sentences. os.path.isfile, not Path.is_file,
        # which raises on a sentence too long to be a file name.
        if os.path.isfile(t):
            print(f"warning: {t!r} is classified as the text itself, not the contents of that file "
                  "(a text model reads the words given)", file=sys.stderr)
    for t, why in failed:
        print(f"error: {t!r}: {why}", file=sys.stderr)
    results = {}
    if texts:
        with torch.no_grad():
            logits = head(text.embed(texts, encoder))
        results = dict(zip(texts, models.topk(logits, k=args.top, classes=classes)))
    return _print_predictions(results, failed, args.json)


def _print_predictions(results: dict, failed: list, as_json: bool) -> int:
    """Print ``{input: [(class, probability), ...]}`` and the inputs that failed; 1 if any did."""
    if as_json:
        payload = {n: [{"class": c, "probability": round(p, 5)} for c, p in preds] for n, preds in results.items()}
        payload.update({n: {"error": why} for n, why in failed})
        print(json.dumps(payload, indent=2))
    else:
        for name, preds in results.items():
            print(name)
            for rank, (cls, prob) in enumerate(preds, 1):
                print(f"  {rank}. {prob:6.1%}  {cls}")
    return 1 if failed else 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _add_folder_arguments(p, texts: bool = False) -> None:
    """TRAIN, VAL and the options ``probe`` and ``finetune`` share; ``texts``: CSV files of texts too."""
    train_help = "folder with one subfolder of images per class"
    val_help = "validation folder with the same class subfolders"
    if texts:
        train_help += ", or a CSV file of texts with a header row (.tsv: tab-separated)"
        val_help += ", or a validation CSV with the same columns"
        p.add_argument("--text-column", metavar="NAME", help="CSV column holding the texts (default text)")
        p.add_argument("--label-column", metavar="NAME", help="CSV column holding the labels (default label; "
                                                              "BANKING77's train.csv: category)")
    p.add_argument("train_dir", metavar="TRAIN" if texts else "TRAIN_DIR", help=train_help)
    p.add_argument("val_dir", metavar="VAL" if texts else "VAL_DIR", nargs="?", help=val_help)
    p.add_argument("--val-split", type=float, metavar="F", help="no validation data: hold out this fraction of the training data (e.g. 0.2)")
    p.add_argument("--image-size", type=_positive_int, default=224, metavar="PX", help="input size in pixels (default 224; 160 is ~2x faster)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--out", metavar="FILE", help="save the model (with class names and preprocessing) for `tlcourse predict --model`")


def _load_folders(args, transform, val_transform=None, warn: bool = True):
    """``folders.load_train_val`` for a command; returns None after printing a clear error.
    Warnings (skipped files) are printed with ``warn``, and by rank 0 only in a distributed job."""
    import warnings

    from tlcourse import folders
    from tlcourse.datasets import ImageFolderError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            data = folders.load_train_val(args.train_dir, args.val_dir, args.val_split, transform=transform,
                                          val_transform=val_transform, seed=args.seed)
        except (ImageFolderError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return None
    for w in caught if warn and os.environ.get("RANK", "0") == "0" else ():
        print(f"warning: {w.message}", file=sys.stderr)
    return data


def _report(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    unit = "texts" if "train_texts" in summary else "images"
    size = f" at {summary['image_size']} px" if "image_size" in summary else ""
    width = max([20] + [len(c) + 1 for c in summary["per_class_accuracy"]])  # intent names run long
    print(f"{summary['method']} on {summary['backbone']}{size}")
    print(f"  train {summary['train_' + unit]} {unit}, validation {summary['val_' + unit]} {unit}, "
          f"{len(summary['classes'])} classes")
    print(f"  {'class':<{width}} {'val ' + unit:>10} {'accuracy':>9}")
    for cls, acc in summary["per_class_accuracy"].items():
        print(f"  {cls:<{width}} {summary['val_counts'][cls]:>10} {acc:>9.3f}")
    print(f"  {'all':<{width}} {summary['val_' + unit]:>10} {summary['accuracy']:>9.3f}")
    if unit == "images":
        print(f"  {summary['seconds']:.1f} s in all, {summary['images_per_second']:.1f} images/s through the network")
    else:
        print(f"  {summary['seconds']:.1f} s in all, {summary['embedding_seconds']:.1f} s of it embedding "
              "(cached: a rerun on the same files skips it)")
    if summary.get("saved"):
        size = f" ({summary['saved_bytes'] / 1e6:.2f} MB)" if "saved_bytes" in summary else ""
        inputs = "IMAGE..." if unit == "images" else '"a sentence" ...'
        print(f"  saved to {summary['saved']}{size}  (use: tlcourse predict --model {summary['saved']} {inputs})")


def _is_text_data(path: str) -> bool:
    # A missing "x.csv" is text too, so that its error speaks of files rather than image folders.
    return Path(path).suffix.lower() in (".csv", ".tsv") or os.path.isfile(path)


def _cmd_probe(args) -> int:
    import time

    from tlcourse import env, features, folders, models

    if _is_text_data(args.train_dir):
        return _probe_texts(args)
    if args.text_column or args.label_column:
        print(f"error: --text-column and --label-column are for a CSV file of texts; {args.train_dir} is "
              "read as an image folder", file=sys.stderr)
        return 2
    start = time.perf_counter()
    env.seed_everything(args.seed)
    device = env.device()
    model = models.efficientnet_lite0()
    data = _load_folders(args, models.preprocess(model, image_size=args.image_size))
    if data is None:
        return 2
    backbone, _ = models.split_backbone_head(model)
    t0 = time.perf_counter()
    x_train, y_train = features.extract_features(backbone, data.train, device=device, desc="train features")
    x_val, y_val = features.extract_features(backbone, data.val, device=device, desc="val features")
    feature_seconds = time.perf_counter() - t0
    probe = features.linear_probe(x_train, y_train, C=args.C)
    predicted = probe.predict(x_val.numpy())
    summary = {
        "method": "linear probe", "backbone": "efficientnet_lite0", "image_size": args.image_size,
        "classes": data.classes, "train_images": len(y_train), "val_images": len(y_val),
        "val_counts": data.counts("val"),
        "accuracy": float((predicted == y_val.numpy()).mean()),
        "per_class_accuracy": folders.per_class_accuracy(predicted, y_val, data.classes),
        "skipped": [str(p) for p, _ in data.skipped],
        "images_per_second": (len(y_train) + len(y_val)) / feature_seconds,
    }
    if args.out:
        model.reset_classifier(len(data.classes))
        model.classifier = features.probe_to_linear(probe)
        summary["saved"] = str(models.save_classifier(args.out, model, data.classes, args.image_size,
                                                      method="linear probe", accuracy=summary["accuracy"]))
    summary["seconds"] = time.perf_counter() - start
    _report(summary, args.json)
    return 0


def _probe_texts(args) -> int:
    """``probe`` on CSV files: all-MiniLM-L6-v2 embeds the texts once (cached), a logistic
    regression learns the labels, as the image probe does on EfficientNet-Lite0's features."""
    import time

    import numpy as np

    from tlcourse import features, folders, text

    start = time.perf_counter()
    columns = {"text_column": args.text_column or "text", "label_column": args.label_column or "label"}
    try:
        if (args.val_dir is None) == (args.val_split is None):
            raise ValueError("Give either a validation CSV or --val-split, not both." if args.val_dir else
                             "No validation data: give a validation CSV with the same columns, or --val-split "
                             "0.2 to hold out 20% of the training texts.")
        train = text.read_labelled_csv(args.train_dir, **columns)
        if len(train.classes) < 2:
            raise ValueError(f"{args.train_dir} has one label only ({train.classes[0]!r}) in column "
                             f"{columns['label_column']!r}: a classifier needs at least two classes.")
        if args.val_dir:
            val = text.read_labelled_csv(args.val_dir, **columns, classes=train.classes)
        else:
            train_idx, val_idx = text.stratified_split(train.labels, args.val_split, args.seed, train.classes)
        encoder = text.load_encoder()
    except (FileNotFoundError, ValueError, text.EncoderUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    # The whole training file is embedded (and cached) even when part of it is held out, so that
    # another --val-split or --seed reuses the same cached embeddings.
    x = text.cached_embed(train.texts, encoder, progress=not args.json)
    if args.val_dir:
        x_train, y_train, train_texts = x, train.labels, train.texts
        x_val, y_val, val_texts = text.cached_embed(val.texts, encoder, progress=not args.json), val.labels, val.texts
    else:
        x_train, y_train, train_texts = x[train_idx], train.labels[train_idx], [train.texts[i] for i in train_idx]
        x_val, y_val, val_texts = x[val_idx], train.labels[val_idx], [train.texts[i] for i in val_idx]
    embedding_seconds = time.perf_counter() - t0
    leaked = len(set(val_texts) & set(train_texts))
    if leaked:
        print(f"warning: {leaked} validation text(s) also appear in the training data, so the accuracy is "
              "optimistic: remove the duplicates", file=sys.stderr)
    probe = features.linear_probe(x_train, y_train, C=args.C)
    predicted = probe.predict(x_val.numpy())
    val_counts = dict(zip(train.classes, np.bincount(y_val, minlength=len(train.classes)).tolist()))
    summary = {
        "method": "linear probe", "backbone": text.UPSTREAM, "input": "text", **columns,
        "classes": train.classes, "train_texts": len(y_train), "val_texts": len(y_val), "val_counts": val_counts,
        "accuracy": float((predicted == y_val).mean()),
        # A class absent from the validation data has no accuracy (NaN is not JSON): left out.
        "per_class_accuracy": {c: a for c, a in folders.per_class_accuracy(predicted, y_val, train.classes).items()
                               if val_counts[c]},
        "embedding_seconds": embedding_seconds,
    }
    if args.out:
        saved = text.save_classifier(args.out, features.probe_to_linear(probe), train.classes, encoder,
                                     method="linear probe", accuracy=summary["accuracy"], **columns)
        summary["saved"], summary["saved_bytes"] = str(saved), saved.stat().st_size
    summary["seconds"] = time.perf_counter() - start
    _report(summary, args.json)
    return 0


def _cmd_finetune(args) -> int:
    from tlcourse import distributed

    if args.accumulate > 1 and args.nproc is None and not distributed.launched():
        args.nproc = 1   # accumulation lives in the distributed loop, which also runs as one process
    if args.nproc is not None and not distributed.launched():
        return _launch_finetune(args)
    ctx = distributed.init() if distributed.launched() else None
    try:
        return _finetune(args, ctx)
    finally:
        distributed.shutdown()


def _finetune(args, ctx) -> int:
    """``tlcourse finetune`` in this process: alone (``ctx`` None) or as one rank of a job."""
    import time

    from tlcourse import distributed, env, finetune, folders, models, train

    start = time.perf_counter()
    device = env.device() if ctx is None else ctx.device
    data = _load_folders(args, transform=None)
    if data is None:
        return 2
    mean, std = models.normalization(models.efficientnet_lite0(pretrained=False))
    short = finetune.short_side_for(args.image_size)

    def decoded(dataset, transform):
        paths, labels = zip(*folders.samples(dataset))
        return finetune.PreDecoded.from_paths(paths, labels, data.classes, short, transform)

    train_set = decoded(data.train, finetune.train_transform(args.image_size, mean, std))
    val_set = decoded(data.val, finetune.eval_transform(args.image_size, mean, std))
    method = args.method or ("full" if args.blocks == "all" else "last-k")
    try:
        strategy, lora = _finetune_strategy(method, args, train_set, device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def make_model():
        return models.efficientnet_lite0(num_classes=len(data.classes))

    if ctx is None:
        generator = env.seed_everything(args.seed)
        train_loader = train.make_loader(train_set, args.batch_size, shuffle=True, device=device, generator=generator)
        val_loader = train.make_loader(val_set, 64, device=device)
        result = finetune.run_strategy(make_model, strategy, train_loader, val_loader, device=device,
                                       seed=args.seed, progress=not args.json)
        model, trainable, val_curve = result.model, result.trainable, result.history["val_acc"]
        logits, labels = train.predict(model.to(device), val_loader, device)
        throughput = len(train_set) * args.epochs / result.seconds
        parallel = {}
    else:
        run = distributed.fit(make_model, strategy, train_set, val_set, ctx, batch_size=args.batch_size,
                              accumulate=args.accumulate, seed=args.seed, progress=not args.json)
        if not ctx.is_main:
            return 0
        model, trainable, val_curve = run.model, run.trainable, run.history["val_acc"]
        logits, labels, throughput = run.logits, run.labels, run.images_per_second
        parallel = {"processes": ctx.world_size, "backend": ctx.backend, "batch_size": args.batch_size,
                    "per_process_batch": run.per_rank_batch, "accumulate": args.accumulate, "steps": run.steps,
                    "train_seconds": run.train_seconds}
    predicted = logits.argmax(1)
    summary = {
        "method": strategy.name, "backbone": "efficientnet_lite0", "image_size": args.image_size,
        "classes": data.classes, "train_images": len(train_set), "val_images": len(val_set),
        "val_counts": data.counts("val"), "epochs": args.epochs, "trainable_parameters": trainable,
        "accuracy": float((predicted == labels).float().mean()),
        "per_class_accuracy": folders.per_class_accuracy(predicted, labels, data.classes),
        "val_accuracy_per_epoch": val_curve,
        "skipped": [str(p) for p, _ in data.skipped],
        "images_per_second": throughput, **parallel,
    }
    if args.out:
        # Full fine-tuning changed every weight; the other methods save what they trained (with
        # BatchNorm kept in eval mode nothing else moved) and load on top of the pretrained weights.
        saved = models.save_classifier(args.out, model, data.classes, args.image_size,
                                       trained_only=method not in ("full", "lp-ft"), lora=lora,
                                       method=strategy.name, accuracy=summary["accuracy"])
        summary["saved"], summary["saved_bytes"] = str(saved), saved.stat().st_size
    summary["seconds"] = time.perf_counter() - start
    _report(summary, args.json)
    return 0


def _launch_finetune(args) -> int:
    """``tlcourse finetune --nproc N``: ``torchrun --standalone --nproc-per-node N -m tlcourse.cli
    finetune ...`` (the same arguments without ``--nproc``); every rank runs :func:`_finetune`."""
    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from tlcourse import distributed

    # Check what can be checked before starting N processes that would each say the same thing.
    if _load_folders(args, transform=None, warn=False) is None:   # rank 0 warns
        return 2
    try:
        distributed.split_batch(args.batch_size, args.nproc, args.accumulate)
    except ValueError as exc:
        print(f"error: --batch-size: {exc}", file=sys.stderr)
        return 2
    # Each process gets its share of the cores (torchrun would otherwise set 1 thread each).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    argv, skip = [], False
    for arg in args.argv:   # the same command line without --nproc N
        if not skip and not _is_nproc(arg):
            argv.append(arg)
        skip = _is_nproc(arg) and "=" not in arg
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(["--standalone", f"--nproc-per-node={args.nproc}", "-m", "tlcourse.cli", *argv]))
    except ChildFailedError as exc:
        print(f"error: {distributed.failure_message(exc)}", file=sys.stderr)
        return 1
    return 0


def _is_nproc(arg: str) -> bool:
    name = arg.split("=", 1)[0]
    return len(name) > 3 and "--nproc".startswith(name)   # argparse accepts --npr for --nproc


METHODS = ("full", "last-k", "lora", "bitfit", "lp-ft")


def _finetune_strategy(method: str, args, train_set, device):
    """The :class:`tlcourse.finetune.Strategy` of ``--method`` (and the LoRA settings to save)."""
    from tlcourse import efficient, features, finetune, models, robust

    common = {"lr": args.lr, "epochs": args.epochs}
    if method == "full":
        if args.blocks != "all":
            raise ValueError("--method full trains every group; for the last K use --method last-k --blocks K")
        return finetune.Strategy("fine-tune all", blocks=None, layer_decay=args.layer_decay, **common), None
    if method == "last-k":
        if args.blocks == "all":
            raise ValueError("--method last-k needs --blocks K (the layer groups below the head to train)")
        k = int(args.blocks)
        return finetune.Strategy(f"fine-tune last {k} group(s)", blocks=k, layer_decay=args.layer_decay, **common), None
    if method == "lora":
        lora = {"rank": args.rank, "alpha": float(args.rank)}
        return finetune.Strategy(f"LoRA rank {args.rank}", prepare=lambda m: efficient.add_lora(m, **lora), **common), lora
    if method == "bitfit":
        return finetune.Strategy("BitFit", prepare=efficient.select_bitfit, **common), None
    # LP-FT: a logistic regression on the frozen features of the (centre-cropped) training
    # images, then every weight fine-tuned from it.
    mean, std = models.normalization(models.efficientnet_lite0(pretrained=False))
    backbone = models.efficientnet_lite0()
    backbone.reset_classifier(0)
    x, y = features.extract_features(backbone, train_set.with_transform(finetune.eval_transform(args.image_size, mean, std)),
                                     device=device, desc="probe features", progress=not args.json)
    probe = features.linear_probe(x, y)
    return finetune.Strategy("LP-FT", prepare=lambda m: finetune.unfreeze(robust.start_from_probe(m, probe)), **common), None


def _cmd_run(args) -> int:
    from tlcourse import notebooks

    paths = [Path(p) for p in args.notebooks] or sorted((notebooks.ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    code = 0
    for path in paths:
        seed = "" if args.seed is None else f", seed {args.seed}"
        print(f"running {path} (profile {args.profile or 'default'}{seed}) ...", flush=True)
        res = notebooks.run_notebook(path, out_dir=args.out, profile=args.profile, timeout=args.timeout,
                                     inplace=args.inplace, seed=args.seed)
        if res.ok:
            print(f"  ok in {res.seconds:.0f} s -> {res.executed}, {res.html}")
        else:
            code = 1
            print(f"  FAILED after {res.seconds:.0f} s", file=sys.stderr)
            if res.failing_cell:
                print("  failing cell:\n" + "\n".join("    " + line for line in res.failing_cell.splitlines()), file=sys.stderr)
            lines = [ln for ln in res.error.strip().splitlines() if ln.strip(" -")]
            if lines:
                print("  " + lines[-1], file=sys.stderr)
            if res.executed:
                print(f"  partial output: {res.executed}", file=sys.stderr)
    return code


def _cmd_results(args) -> int:
    from tlcourse import notebooks

    if args.write:
        print(f"updated {notebooks.update_readme(results_dir=args.dir)}")
    else:
        print(notebooks.results_table(args.dir))
    return 0


def _cmd_bench_kd(args) -> int:
    import dataclasses

    try:
        from tlcourse import _tf  # noqa: F401  (TensorFlow after torch: see tlcourse/_tf.py)
    except (ImportError, RuntimeError) as exc:     # not installed, or Keras on another backend
        print(f"tlcourse bench kd: {exc}", file=sys.stderr)
        return 2
    import tensorflow as tf
    import torch

    from tlcourse import datasets, distill_crossing

    tf.get_logger().setLevel("ERROR")   # its retracing notices: each student run is a new model, by design

    if args.threads:    # before TensorFlow runs its first op; both frameworks' numbers depend on it
        torch.set_num_threads(args.threads)
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    settings = dataclasses.replace(distill_crossing.Settings(), **{k: v for k, v in (
        ("views", args.views), ("epochs", args.epochs), ("teacher_epochs", args.teacher_epochs)) if v})
    try:
        report = distill_crossing.crossing(range(args.first_seed, args.first_seed + args.seeds), settings,
                                           device=args.device, log=lambda line: print(line, flush=True),
                                           download=not args.no_download)
    except datasets.DatasetUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["threads"] = torch.get_num_threads()
    print(distill_crossing.summary_markdown(report["summary"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


_BENCH_ONLY = {"da": ("pair", "methods", "steps", "size", "limit", "profile"),
               "kd": ("first_seed", "views", "epochs", "teacher_epochs", "threads")}


def _cmd_bench(args) -> int:
    import dataclasses

    other = "da" if args.suite == "kd" else "kd"
    wrong = [f"--{name.replace('_', '-')}" for name in _BENCH_ONLY[other] if getattr(args, name)]
    if wrong:       # better refused than silently ignored
        print(f"tlcourse bench {args.suite}: {', '.join(wrong)} only apply to tlcourse bench {other}", file=sys.stderr)
        return 2
    if args.suite == "kd":
        return _cmd_bench_kd(args)

    from tlcourse import adapt, datasets, env

    preset = adapt.BENCH_PROFILES[args.profile or env.profile()]
    pairs = [tuple(p.split(":", 1)) for p in args.pair] if args.pair else list(preset["pairs"])
    if any(len(p) != 2 for p in pairs):
        print("tlcourse bench da: --pair takes SOURCE:TARGET, e.g. digits:digits_m", file=sys.stderr)
        return 2
    config = dataclasses.replace(preset["config"], **{k: v for k, v in (("steps", args.steps),) if v})
    size = args.size or preset["size"]
    device = env.device(args.device)
    methods = args.methods.split(",") if args.methods else list(adapt.METHODS)
    report = {"profile": args.profile or env.profile(), "pairs": []}
    for source, target in pairs:
        print(f"{source} -> {target}: {', '.join(methods)} x {args.seeds} seeds, {config.steps} steps, "
              f"{size} px, {device}", flush=True)
        try:
            result = adapt.bench_pair(source, target, methods, range(args.seeds), config, size,
                                      args.limit or preset["limit"], device, download=not args.no_download)
        except (ValueError, datasets.DatasetUnavailable) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        report["pairs"].append(result)
        print(adapt.summary_markdown(result["summary"]))
        if result["published"]:
            pub = result["published"]
            print("published (" + pub["source"] + "): " + ", ".join(f"{k} {v}" for k, v in pub.items()
                                                                  if k not in ("source", "note")))
            print("  note: " + pub["note"])
        print(f"{result['seconds']:.0f} s\n", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlcourse", description="Tools of the tlcourse transfer-learning course.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("env", help="versions, device, profile, data directory and datasets present",
                       description="Explain this machine: versions, device, profile, where data is and what is there.")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("data", help="list, verify or fetch datasets",
                       description="list: the registry; verify: check what is on disk against checksums; "
                                   "fetch NAME: download (checksummed) into the data directory.")
    p.add_argument("action", choices=["list", "verify", "fetch"])
    p.add_argument("names", nargs="*", help="dataset names (verify: default all)")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("predict", help="ImageNet top-K classes of images with the offline backbone",
                       description="Classify images with EfficientNet-Lite0 (ImageNet weights, no download). "
                                   "A missing or unreadable file is reported by name; the others still print. "
                                   "With --model from `tlcourse probe TRAIN.csv --out`, classify texts instead: "
                                   'tlcourse predict --model M "a sentence" "another".')
    p.add_argument("images", nargs="+", metavar="INPUT", help="image files, or texts for a text model (--model)")
    p.add_argument("--top", type=int, default=5, metavar="K", help="how many classes per image or text (default 5)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("--model", metavar="FILE", help="a model saved by `tlcourse probe/finetune --out` (default: ImageNet classes)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("probe", help="train a linear probe on your own image folders or CSV files of texts",
                       description="Feature extraction on any folder of class-named subfolders: the frozen "
                                   "EfficientNet-Lite0 computes features once, a logistic regression learns your "
                                   "classes. Give a validation folder with the same class subfolders, or --val-split. "
                                   "A CSV file (header row; columns text and label, or --text-column/--label-column) "
                                   "is a text probe: all-MiniLM-L6-v2's sentence embeddings (offline, cached) "
                                   "instead of image features.")
    _add_folder_arguments(p, texts=True)
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression (default 1)")
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("finetune", help="fine-tune the backbone on your own image folders",
                       description="Fine-tune EfficientNet-Lite0 on any folder of class-named subfolders: a new head, "
                                   "the last --blocks layer groups (or all) trained with AdamW, warm-up + cosine "
                                   "learning rate, layer-wise learning rates, BatchNorm kept in eval mode, and "
                                   "random-resized-crop + flip augmentation. Use a GPU for more than a few hundred images.")
    _add_folder_arguments(p)
    p.add_argument("--epochs", type=_positive_int, default=8, help="passes over the training images (default 8)")
    p.add_argument("--method", choices=METHODS,
                   help="what to train: full (every weight), last-k (head + --blocks groups), lora (low-rank "
                        "adapters on the 1x1 convolutions + head), bitfit (BatchNorm scales/shifts + head), lp-ft "
                        "(a linear probe first, then every weight); default: full, or last-k when --blocks is a number. "
                        "lora and bitfit --out files hold only what they trained")
    p.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank (default 8; alpha = rank)")
    p.add_argument("--blocks", default="all", help="layer groups below the head to train: a number, or 'all' (default)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the head (default 1e-3)")
    p.add_argument("--layer-decay", type=float, default=0.5, help="each earlier group's lr is this times the next "
                                                                    "(default 0.5; full and last-k only)")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="images per optimizer step, over all processes and accumulation steps (default 32)")
    p.add_argument("--nproc", type=_positive_int, metavar="N",
                   help="train data-parallel in N local processes (PyTorch DDP, launched by torch.distributed.run; "
                        "one per GPU, or CPU processes sharing the cores); for several machines start "
                        "`torchrun ... -m tlcourse.cli finetune ...` on each instead (see the README)")
    p.add_argument("--accumulate", type=_positive_int, default=1, metavar="K",
                   help="split each batch into K micro-batches per process and sum their gradients (default 1; "
                        "same steps, less memory)")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("run", help="execute notebooks headless into build/ (ipynb + HTML)",
                       description="Execute notebooks in fresh kernels; write executed .ipynb and .html to --out. "
                                   "Exits non-zero and shows the failing cell when a notebook fails.")
    p.add_argument("notebooks", nargs="*", metavar="NOTEBOOK", help="default: every chapter notebook")
    p.add_argument("--profile", choices=["quick", "full"], help="TLCOURSE_PROFILE for the run")
    p.add_argument("--seed", type=_non_negative_int, help="TLCOURSE_SEED for the run (default: as set, else 0)")
    p.add_argument("--out", default="build", help="output folder (default build/)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default 1800)")
    p.add_argument("--inplace", action="store_true", help="also save outputs into the notebook (for committing)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("results", help="the results table from build/results/*.json",
                       description="Print the chapters' headline numbers (written by the notebooks) as a Markdown "
                                   "table; --write puts it into README.md between the results markers.")
    p.add_argument("--dir", help="results folder (default build/results)")
    p.add_argument("--write", action="store_true", help="update README.md")
    p.set_defaults(func=_cmd_results)

    p = sub.add_parser("bench", help="reproducible benchmarks (da: chapter 03's domain adaptation; kd: chapter "
                                     "04's distillation crossed with its Keras companion's)",
                       description="da: run every domain-adaptation method over several seeds on digit domain pairs "
                                   "and print target accuracy mean ± std (with the target oracle and, for the "
                                   "anchor pairs, the published numbers). Defaults follow the profile: quick = "
                                   "the offline digits -> digits_m pair on a CPU; full = MNIST/USPS/SVHN/MNIST-M "
                                   "(downloaded once, checksummed), meant for a GPU. kd: for each course seed, "
                                   "chapter 04's and 04 K's transfer sets (teacher + views), each teacher also on "
                                   "the other's views, and both students, scratch and distilled, on all of them "
                                   "(quick settings; needs the tensorflow extra; ~4 min per seed on one thread).")
    p.add_argument("suite", choices=["da", "kd"], help="which benchmark (da: domain adaptation; kd: distillation)")
    p.add_argument("--pair", action="append", metavar="SOURCE:TARGET",
                   help="a domain pair (repeatable); names from tlcourse.digits.DOMAINS")
    p.add_argument("--methods", help="comma-separated subset of " + ",".join(
        ("source_only", "dann", "coral", "mmd", "adabn", "self_training")))
    p.add_argument("--seeds", type=_positive_int, default=3,
                   help="da: seeds per method; kd: course seeds, from --first-seed (default 3)")
    p.add_argument("--steps", type=_positive_int, help="training steps per run (default: the profile's)")
    p.add_argument("--size", type=_positive_int, help="image side in pixels (default: the profile's)")
    p.add_argument("--limit", type=_positive_int, help="at most this many images per split of an online domain")
    p.add_argument("--profile", choices=["quick", "full"], help="default: TLCOURSE_PROFILE (quick on a CPU)")
    p.add_argument("--device", help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading a missing dataset")
    p.add_argument("--json", metavar="FILE", help="also write runs and summary as JSON")
    p.add_argument("--first-seed", type=int, default=0, help="kd: the first course seed (default 0)")
    p.add_argument("--views", type=_positive_int, help="kd: views per photo (default 6, as the notebooks)")
    p.add_argument("--epochs", type=_positive_int, help="kd: student epochs (default 12)")
    p.add_argument("--teacher-epochs", type=_positive_int, help="kd: teacher epochs (default 4)")
    p.add_argument("--threads", type=_positive_int,
                   help="kd: CPU threads for torch and TensorFlow (the numbers depend on it; default: as set up)")
    p.set_defaults(func=_cmd_bench)

    from tlcourse.grading.commands import add_commands  # grade, exercises

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv   # `finetune --nproc` passes them on to its processes
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
