"""tf.data input pipelines for the Keras companions, fed from the same data registry.

The PyTorch chapters read datasets through :mod:`tlcourse.datasets` (layout checked, clear
errors, offline fallbacks). The Keras notebooks use the very same objects, so a split is the
same photos in both frameworks, and turn them into ``tf.data`` pipelines here:

1. :func:`decode_images` decodes every image **once** with TensorFlow's own decoder, resizes its
   short side to ``side`` (bicubic, antialiased), centre-crops a ``side`` x ``side`` square and
   keeps the result as ``uint8`` (397 hymenoptera photos at 183 px: 40 MB). The whole resized photo
   is kept too (``Decoded.photos``), for crops that may reach its sides, as chapter 04's do. An
   unreadable file raises :class:`UnreadableImage` naming it, before any training starts.
2. :func:`pipeline` serves batches from that array: a centre crop for evaluation, or a random
   crop plus a horizontal flip for training, seeded so two runs see the same crops. Pixels stay
   in ``[0, 255]`` (float32), as :func:`tlcourse.keras_models.efficientnet_lite0` expects.

Why not ``keras.utils.image_dataset_from_directory``: it decodes every JPEG again each epoch
(or needs ``.cache()`` after a resize that stretches or crops to the final size, leaving no room
for a random crop, unless resized to the decode size and cropped in a second step), and it cannot
read the bundled array datasets used offline. The crop geometry is the PyTorch chapters': decode to
a side of about ``size / 0.875``, centre crop ``size``. Pass the side their pipeline uses to match
it to the pixel (:func:`side_for` is timm's rule, chapter 01's; chapters 02 and 04 use
``finetune.short_side_for``, which rounds up).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from tlcourse._tf import tf

CROP_FRACTION = 0.875  # as timm's and torchvision's eval transforms: resize to S / 0.875, crop S


class UnreadableImage(ValueError):
    """An image file that TensorFlow cannot decode (truncated, not an image, ...)."""


@dataclass
class Decoded:
    """Decoded images of one split: ``images [N, side, side, 3]`` uint8, ``labels [N]`` int32.

    ``photos``: the same images before the centre crop, each ``[h, w, 3]`` uint8 with its short
    side ``side`` (``None``: crop views from ``images``).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    photos: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.labels)


def side_for(image_size: int) -> int:
    """Side of the decoded square from which a centre crop of ``image_size`` is taken (224 -> 256).

    timm's rule, ``floor(image_size / 0.875)`` (160 -> 182), so that a Keras pipeline sees the same
    geometry as ``models.preprocess`` (chapter 01). Chapters 02 and 04 decode with
    ``finetune.short_side_for``, which rounds up (128 -> 147); pass that side to match them.
    """
    return int(math.floor(image_size / CROP_FRACTION))


def _photo(image: tf.Tensor, side: int) -> np.ndarray:
    """``[h, w, 3]`` uint8 -> uint8 with the short side resized to ``side`` (bicubic, antialiased)."""
    h, w = int(image.shape[0]), int(image.shape[1])
    scale = side / min(h, w)
    size = (max(side, round(h * scale)), max(side, round(w * scale)))
    resized = tf.image.resize(image, size, method="bicubic", antialias=True)
    # Bicubic overshoots a little beyond [0, 255]; clip before the cast back to bytes.
    return tf.clip_by_value(tf.round(resized), 0, 255).numpy().astype(np.uint8)


def _centre(photo: np.ndarray, side: int) -> np.ndarray:
    """The centre ``[side, side, 3]`` square of a photo whose short side is ``side``."""
    top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
    return photo[top:top + side, left:left + side]


def decode_images(source, side: int, progress: bool = True) -> Decoded:
    """Decode a dataset from :mod:`tlcourse.datasets` once into ``uint8 [N, side, side, 3]``.

    ``source`` is an image folder (anything with ``.samples`` and ``.classes``, e.g.
    ``datasets.hymenoptera("val")`` or ``datasets.image_folder(path)``), a folder path (checked
    by :func:`tlcourse.datasets.image_folder`), or an array dataset such as
    ``datasets.lfw_faces("train")`` (``.images`` in ``[0, 1]``, grey or RGB, and ``.targets``).
    """
    from tlcourse import datasets

    if isinstance(source, (str, os.PathLike)):
        source = datasets.image_folder(source)
    photos, labels = [], []
    if hasattr(source, "samples"):
        for path, label in tqdm(source.samples, desc="decoding", leave=False, disable=not progress):
            try:
                image = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
            except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as exc:
                raise UnreadableImage(
                    f"TensorFlow cannot decode {path}: {exc.message.splitlines()[0]}. Remove or replace "
                    "the file (datasets.check_images lists every unreadable image of a folder)."
                ) from None
            photos.append(_photo(image, side))
            labels.append(label)
    elif hasattr(source, "images"):
        pixels = np.uint8(np.clip(np.asarray(source.images, dtype=np.float32), 0, 1) * 255)
        if pixels.ndim == 3:  # grey [N, h, w] -> RGB, as PIL's convert("RGB") does for the PyTorch side
            pixels = np.repeat(pixels[..., None], 3, axis=-1)
        photos = [_photo(tf.constant(p), side) for p in pixels]
        labels = list(source.targets)
    else:
        raise TypeError(f"Cannot decode {type(source).__name__}: give an image folder, a folder path "
                        "or an array dataset from tlcourse.datasets.")
    return Decoded(np.stack([_centre(p, side) for p in photos]), np.asarray(labels, dtype=np.int32),
                   list(source.classes), photos)


def pipeline(decoded: Decoded, image_size: int, batch_size: int = 32, train: bool = False,
             seed: int = 0) -> tf.data.Dataset:
    """Batches ``(pixels [B, S, S, 3] float32 in [0, 255], labels [B] int32)`` from decoded images.

    ``train=False``: centre crops, in order. ``train=True``: shuffled every epoch, a random
    ``S x S`` crop and a random horizontal flip per image. The randomness is stateless and drawn
    from ``seed``, so the same seed gives the same batches and crops, epoch for epoch. Iterating
    the *same* dataset object again continues its random stream (the next epoch's crops): build a
    new pipeline to replay it, e.g. for two runs that must see the same batches.
    """
    side = decoded.images.shape[1]
    if image_size > side:
        raise ValueError(f"image_size {image_size} is larger than the decoded images ({side} px); "
                         f"decode with side >= {image_size} (side_for({image_size}) = {side_for(image_size)}).")
    ds = tf.data.Dataset.from_tensor_slices((decoded.images, decoded.labels))
    if not train:
        offset = (side - image_size) // 2

        def centre(x, y):
            return tf.cast(x[offset:offset + image_size, offset:offset + image_size], tf.float32), y

        return ds.map(centre, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)

    ds = ds.shuffle(len(decoded), seed=seed, reshuffle_each_iteration=True)
    # One random pair of int64 per element, different each epoch but fixed by `seed`: the
    # stateless ops below then give the same crops however many threads map in parallel.
    randomness = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def augment(example, rng):
        x, y = example
        x = tf.image.stateless_random_crop(x, (image_size, image_size, 3), seed=rng)
        x = tf.image.stateless_random_flip_left_right(x, seed=rng[::-1])
        return tf.cast(x, tf.float32), y

    ds = tf.data.Dataset.zip((ds, randomness)).map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def augmented_views(decoded: Decoded, views: int, size: int, scale: tuple[float, float] = (0.25, 1.0),
                    seed: int = 0, whole_photo: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``views`` random resized crops of every image: a fixed transfer set for distillation.

    The Keras twin of :func:`tlcourse.distill.augmented_views`: each view covers a random
    ``scale`` fraction of the image's area (aspect ratio 3/4 to 4/3), resized to ``size`` and
    flipped half of the time. Returns ``uint8 [N * views, size, size, 3]`` and the labels repeated
    ``[N * views]`` (view ``v`` of image ``i`` at ``v * N + i``). Stateless random ops seeded from
    ``seed``, so the set is the same on every run. Crops that cut most of the object away are what
    gives the teacher's soft labels something to say that the hard labels do not.

    ``whole_photo`` (default): crop from the whole photo (``decoded.photos``), as torchvision's
    ``RandomResizedCrop`` does on chapter 04's decoded photos; ``False``: from the centre square
    (``decoded.images``), which loses the sides of a landscape photo (a quarter of the average
    hymenoptera photo).
    """
    if whole_photo and decoded.photos is None:
        raise ValueError("whole_photo=True needs decoded.photos (keras_data.decode_images keeps them); "
                         "pass whole_photo=False to crop from the centre squares")
    n = len(decoded)
    sources = decoded.photos if whole_photo else decoded.images
    whole = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])
    out = np.empty((n * views, size, size, 3), np.uint8)
    for v in range(views):
        for i in range(n):
            rng = tf.constant([seed, v * n + i], tf.int64)
            begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
                sources[i].shape, whole, seed=rng, min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
                area_range=scale, use_image_if_no_bounding_boxes=True)
            crop = tf.slice(sources[i], begin, extent)
            crop = tf.image.resize(crop, (size, size), method="bilinear", antialias=True)
            crop = tf.image.stateless_random_flip_left_right(crop, seed=rng[::-1])
            out[v * n + i] = np.uint8(np.clip(np.round(crop.numpy()), 0, 255))
    return out, np.tile(decoded.labels, views)
