"""Digit domains for the domain-adaptation chapter (03): the same ten classes, drawn differently.

Domain adaptation needs a *source* domain with labels and a *target* domain that shows the same
classes in another style, whose labels the learner may not use. Digits are the classic testbed
(Ganin et al. 2016; Long et al. 2015; Sun & Saenko 2016). Offline, three domains are built from
what the installed packages ship:

- ``"syndigits"``: digits rendered from the TrueType fonts matplotlib ships, with random font,
  size, rotation, position, stroke, colours, background and blur (:func:`syn_digits`), in the
  spirit of the "SynNumbers" of Ganin et al. 2016 (rendered from Windows fonts).
- ``"digits"``: scikit-learn's real handwriting, 1,797 images of 8x8 (:func:`handwritten_digits`).
- ``"digits_m"``: the same handwriting blended onto patches of colour photos
  (:func:`blend_on_photos`, the MNIST-M construction of Ganin et al. 2016).

Online (``full`` profile; downloaded through :func:`tlcourse.datasets.torchvision_dataset`):
``"mnist"``, ``"usps"``, ``"svhn"`` and ``"mnist_m"`` (MNIST blended with *our* construction).

:func:`domain_pair` returns both sides of an experiment as ``TensorDataset``\\ s of
``(x float32 [3, size, size] in [0, 1], y int64)``; see :class:`DomainPair`. Everything is
deterministic by seed and vectorised (numpy/torch), so building a pair takes seconds on a CPU.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from . import datasets

__all__ = [
    "CLASSES",
    "FONT_FILES",
    "font_files",
    "syn_digits",
    "handwritten_digits",
    "jittered",
    "blend_on_photos",
    "Domain",
    "DOMAINS",
    "list_domains",
    "domain_pair",
    "DomainPair",
]

CLASSES = [str(d) for d in range(10)]

SeedLike = int | Sequence[int]

# ----------------------------------------------------------------------------- fonts

# The fonts in matplotlib's mpl-data/fonts/ttf whose code points "0"-"9" are ordinary (lining)
# digits. Left out on purpose: cmmi10 (old-style figures with descenders), cmex10 and cmsy10
# (TeX symbol fonts: "0" is a bracket or an arrow there), STIXNonUni*/STIXSiz* (symbol variants,
# no digits), DejaVu*Display (a handful of glyphs) and LastResortHE (a box for every character).
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf",
)

_GLYPH = 64            # side of the canvas each glyph mask is stored on
_GLYPH_HEIGHT = 56     # the glyph's height on that canvas (its width keeps the font's aspect)
_RENDER_PT = 96        # font size the glyphs are rendered at before being scaled down
_STROKES = (0, 3, 6)   # PIL stroke_width at _RENDER_PT: regular, heavier, much heavier


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _render(path: Path, char: str, stroke: int = 0) -> np.ndarray:
    """One character as a uint8 ink mask, cropped to its ink (empty array if it has none)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(path), _RENDER_PT)
    side = 2 * _RENDER_PT
    img = Image.new("L", (side, side), 0)
    ImageDraw.Draw(img).text((side // 4, side // 8), char, font=font, fill=255,
                             stroke_width=stroke, stroke_fill=255)
    box = img.getbbox()
    return np.zeros((0, 0), np.uint8) if box is None else np.asarray(img.crop(box))


def _has_digits(path: Path) -> bool:
    """True when the font draws ten visible, different digits that are not its "missing
    glyph" box (which fonts without digits would draw for every one of them)."""
    try:
        glyphs = [_render(path, c) for c in "0123456789"]
        missing = _render(path, "\ue000")  # a private-use code point: no font maps it
    except OSError:
        return False
    blobs = {(g.shape, g.tobytes()) for g in glyphs}
    return (all(g.size and (g > 127).sum() > 50 for g in glyphs) and len(blobs) == 10
            and (missing.shape, missing.tobytes()) not in blobs)


@functools.lru_cache(maxsize=1)
def font_files() -> tuple[Path, ...]:
    """The fonts :func:`syn_digits` draws from: those of :data:`FONT_FILES` that this
    matplotlib installation ships and that render the ten digits (checked once, cached).

    Raises:
        RuntimeError: none found (a matplotlib without its bundled fonts).
    """
    folder = _font_dir()
    found = tuple(folder / f for f in FONT_FILES if (folder / f).is_file() and _has_digits(folder / f))
    if not found:
        raise RuntimeError(f"No usable digit font among {len(FONT_FILES)} expected in {folder} "
                           "(matplotlib ships them in mpl-data/fonts/ttf). Reinstall matplotlib.")
    return found


@functools.lru_cache(maxsize=1)
def _glyph_masks() -> torch.Tensor:
    """Every (font, stroke, digit) glyph as a float mask ``[fonts, strokes, 10, 64, 64]``,
    height :data:`_GLYPH_HEIGHT`, centred by its ink box.

    Rendered once with PIL (21 fonts x 10 digits x 3 strokes, well under a second) so that the
    per-image work in :func:`syn_digits` is a batched affine warp instead of a PIL call each.
    """
    from PIL import Image

    fonts = font_files()
    out = np.zeros((len(fonts), len(_STROKES), 10, _GLYPH, _GLYPH), np.float32)
    for i, path in enumerate(fonts):
        for j, stroke in enumerate(_STROKES):
            for d in range(10):
                g = _render(path, str(d), stroke)
                h, w = g.shape
                scale = _GLYPH_HEIGHT / h
                nw = max(1, min(_GLYPH - 2, round(w * scale)))
                g = np.asarray(Image.fromarray(g).resize((nw, _GLYPH_HEIGHT), Image.LANCZOS))
                top, left = (_GLYPH - _GLYPH_HEIGHT) // 2, (_GLYPH - nw) // 2
                out[i, j, d, top:top + _GLYPH_HEIGHT, left:left + nw] = g / 255.0
    return torch.from_numpy(out).clamp_(0, 1)


# ----------------------------------------------------------------------------- SynDigits


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``x`` ``[n, c, h, w]`` with its own ``sigma`` ``[n]`` (pixels):
    one grouped convolution per axis, reflect padding."""
    n, c, h, w = x.shape
    r = max(1, int(np.ceil(3 * float(sigma.max()))))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)          # [n*c, 2r+1]
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _colours(rng: np.random.Generator, n: int, p_light_on_dark: float,
             min_contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB ``[n, 3]`` with at least ``min_contrast`` difference in
    luma, the digit lighter than the background with probability ``p_light_on_dark``."""
    # Luma of the dark and the light side first, then colours that have them: a digit that
    # is readable in colour but not in grey would teach the network to rely on hue.
    lo = rng.uniform(0.0, 1.0 - min_contrast, n)
    hi = rng.uniform(lo + min_contrast, 1.0)
    pair = []
    for target in (lo, hi):
        sat = rng.uniform(0.0, 0.8, (n, 1)) * rng.dirichlet(np.ones(3), n)
        rgb = target[:, None] + sat - _luma(sat)[:, None]           # luma(rgb) == target
        # Colours outside the cube are pulled back towards grey of the same luma.
        over = np.maximum((rgb.max(1) - 1) / np.maximum(rgb.max(1) - target, 1e-6), 0)
        under = np.maximum(-rgb.min(1) / np.maximum(target - rgb.min(1), 1e-6), 0)
        shrink = 1 - np.clip(np.maximum(over, under), 0, 1)
        pair.append(np.clip(target[:, None] + (rgb - target[:, None]) * shrink[:, None], 0, 1))
    dark, light = pair
    light_fg = rng.random(n) < p_light_on_dark
    fg = np.where(light_fg[:, None], light, dark)
    bg = np.where(light_fg[:, None], dark, light)
    return fg, bg


def syn_digits(
    n: int,
    size: int = 28,
    seed: SeedLike = 0,
    *,
    p_light_on_dark: float = 0.5,
    p_low_res: float = 0.5,
    height: tuple[float, float] = (0.6, 1.0),
    max_rotation: float = 15.0,
    warp: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SynDigits: ``n`` digits rendered from matplotlib's fonts, each drawn differently.

    Returns ``X`` float32 ``[n, 3, size, size]`` in [0, 1] and ``y`` int64 ``[n]``, balanced
    over 0-9 (each digit ``n // 10`` or ``n // 10 + 1`` times, in random order).

    Per image, at random: one of :func:`font_files` (DejaVu Sans/Mono/Serif, STIX and Computer
    Modern, regular/bold/italic), a stroke width (PIL ``stroke_width``), height ``height`` of
    the frame, aspect, rotation up to ``max_rotation`` degrees, shear, position jitter, digit
    and background colours with a minimum contrast (light-on-dark with probability
    ``p_light_on_dark``, else dark-on-light), a background gradient and low-frequency
    texture, Gaussian blur, noise, and with probability ``p_low_res`` a round trip through a
    low resolution (8 to ``size`` px, as scikit-learn's digits went through 8x8). ``warp``
    (up to that fraction of the half-frame) bends the glyph with a smooth random displacement
    field, a little like handwriting; ``warp=0`` keeps the font's exact shapes.
    The same ``seed`` (an int or a sequence of ints, as for ``numpy.random.default_rng``)
    gives the same tensors.

    Like the SynNumbers of Ganin et al. 2016 this is a cheap labelled source that is plainly
    not handwriting: the gap to real digits is partly appearance (colour, background,
    blur) and partly shape (type vs handwriting), and only the first is what feature-alignment
    methods are designed to remove. 10,000 images at 28 px take one to two seconds.
    """
    if n < 0 or size < 8:
        raise ValueError(f"syn_digits needs n >= 0 and size >= 8, got n={n}, size={size}.")
    rng = np.random.default_rng(seed)
    masks = _glyph_masks()
    n_fonts, n_strokes = masks.shape[:2]

    y = rng.permutation(np.arange(n) % 10)
    font = rng.integers(n_fonts, size=n)
    stroke = rng.choice(n_strokes, size=n, p=[0.4, 0.35, 0.25])
    h = rng.uniform(*height, n)                               # glyph height / frame height
    aspect = rng.uniform(0.8, 1.2, n)
    angle = np.deg2rad(rng.uniform(-max_rotation, max_rotation, n))
    shear = rng.uniform(-0.15, 0.15, n)
    # Jitter within what keeps most of the glyph in the frame (frame coords run over [-1, 1]).
    slack = np.clip(1.0 - h, 0.04, None)
    shift = rng.uniform(-1, 1, (n, 2)) * slack[:, None] * 0.8
    fg, bg = _colours(rng, n, p_light_on_dark, min_contrast=0.3)
    grad = rng.normal(0, 0.12, (n, 2))                        # background luma slope per axis
    texture = rng.uniform(0, 0.12, n)
    blur = rng.uniform(0.0, 1.0, n) * size / 28
    noise = rng.uniform(0, 0.04, n)
    low_res = np.where(rng.random(n) < p_low_res, rng.integers(8, size + 1, n), size)
    wobble = rng.uniform(0, warp, n)                          # amplitude of the smooth warp
    tex_seed = int(rng.integers(2**31))

    # Output pixel -> glyph canvas: the inverse of (scale, shear, rotate, shift).
    s = h / (_GLYPH_HEIGHT / _GLYPH)
    cos, sin = np.cos(angle), np.sin(angle)
    fwd = np.empty((n, 2, 2))
    fwd[:, 0, 0], fwd[:, 0, 1] = cos * s * aspect, -sin * s + cos * shear * s
    fwd[:, 1, 0], fwd[:, 1, 1] = sin * s * aspect, cos * s + sin * shear * s
    inv = np.linalg.inv(fwd)
    theta = np.concatenate([inv, -(inv @ shift[:, :, None])], axis=2)
    theta = torch.from_numpy(theta).float()

    out = torch.empty(n, 3, size, size)
    gen = torch.Generator().manual_seed(tex_seed)
    ss = 2 * size  # warp at twice the size, then average 2x2: anti-aliased edges
    coords = torch.linspace(-1, 1, size)
    for lo in range(0, n, 2048):
        sl = slice(lo, min(n, lo + 2048))
        m = sl.stop - sl.start
        glyph = masks[font[sl], stroke[sl], y[sl]][:, None]            # [m, 1, 64, 64]
        grid = F.affine_grid(theta[sl], [m, 1, ss, ss], align_corners=False)
        # A smooth random displacement field (4x4 control points) bends strokes a little,
        # as a hand does, so that shape alone does not separate fonts from handwriting.
        field = F.interpolate(torch.rand(m, 2, 4, 4, generator=gen) * 2 - 1, size=(ss, ss),
                              mode="bicubic", align_corners=True)
        grid = grid + field.permute(0, 2, 3, 1) * torch.from_numpy(wobble[sl]).float()[:, None, None, None]
        ink = F.avg_pool2d(F.grid_sample(glyph, grid, align_corners=False), 2)  # [m, 1, size, size]

        back = torch.from_numpy(bg[sl]).float()[:, :, None, None].expand(m, 3, size, size)
        g = torch.from_numpy(grad[sl]).float()
        ramp = g[:, 0, None, None] * coords[None, None, :] + g[:, 1, None, None] * coords[None, :, None]
        tex = F.interpolate(torch.rand(m, 1, 4, 4, generator=gen) - 0.5, size=(size, size),
                            mode="bicubic", align_corners=False)
        back = back + ramp[:, None] + tex * torch.from_numpy(texture[sl]).float()[:, None, None, None]
        front = torch.from_numpy(fg[sl]).float()[:, :, None, None]
        img = back * (1 - ink) + front * ink
        img = _gaussian_blur(img, torch.from_numpy(blur[sl]).float())
        for r in np.unique(low_res[sl]):
            if r < size:
                idx = torch.from_numpy(np.flatnonzero(low_res[sl] == r))
                small = F.interpolate(img[idx], size=(int(r), int(r)), mode="area")
                img[idx] = F.interpolate(small, size=(size, size), mode="bicubic", align_corners=False)
        img = img + torch.randn(img.shape, generator=gen) * torch.from_numpy(noise[sl]).float()[:, None, None, None]
        out[sl] = img.clamp_(0, 1)
    return out, torch.from_numpy(y).long()


# ----------------------------------------------------------------------------- real handwriting


def _resize(X: torch.Tensor, size: int) -> torch.Tensor:
    """``[n, c, h, w]`` -> ``[n, c, size, size]``: bicubic, anti-aliased when shrinking,
    clamped back to [0, 1] (bicubic overshoots at edges)."""
    if X.shape[-2:] == (size, size):
        return X
    return F.interpolate(X, size=(size, size), mode="bicubic", align_corners=False,
                         antialias=True).clamp_(0, 1)


def handwritten_digits(size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's handwritten digits (:func:`tlcourse.datasets.digits`, 1,797 of 8x8)
    upsampled to ``size``: ``X`` float32 ``[1797, 3, size, size]`` in [0, 1], a white digit on
    black in three equal channels, ``y`` int64 ``[1797]``.

    The three channels are one expanded tensor (a view, no copy): index it or stack batches
    as usual, but do not write into it in place.
    """
    X, y = datasets.digits()
    X = _resize(torch.from_numpy(X)[:, None], size)
    return X.expand(-1, 3, -1, -1), torch.from_numpy(y)


def jittered(X: torch.Tensor, copies: int, max_shift: int = 2, seed: int = 0) -> torch.Tensor:
    """``copies`` shifted copies of every image ``X [N, C, H, W]`` -> ``[copies * N, C, H, W]``:
    each image moved by a random whole number of pixels in ``[-max_shift, max_shift]`` along each
    axis, the uncovered border filled with 0 (background) and what leaves the frame dropped.
    Copy ``k`` of image ``i`` is at ``k * N + i``. Hinton et al. (2015) train their MNIST teacher
    on inputs "jittered by up to two pixels in any direction". Deterministic by ``seed``.

    torchvision's ``RandomAffine`` draws one shift per call; this draws one per image for a
    whole tensor at once (one slice of the zero-padded batch per distinct shift), which is what
    a small in-memory digit set needs.
    """
    if copies < 1 or max_shift < 0:
        raise ValueError(f"need copies >= 1 and max_shift >= 0, got {copies} and {max_shift}")
    gen = torch.Generator().manual_seed(seed)
    m, (h, w) = max_shift, X.shape[-2:]
    padded = F.pad(X, (m, m, m, m))
    out = []
    for _ in range(copies):
        shifts = torch.randint(-m, m + 1, (len(X), 2), generator=gen)
        moved = torch.empty(X.shape, dtype=X.dtype)
        for dy, dx in torch.unique(shifts, dim=0).tolist():
            rows = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            # Moving the image down by dy reads the padded batch dy rows higher up.
            moved[rows] = padded[rows][..., m - dy:m - dy + h, m - dx:m - dx + w]
        out.append(moved)
    return torch.cat(out)


# ----------------------------------------------------------------------------- MNIST-M construction


@functools.lru_cache(maxsize=4)
def _photo_tensors(names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.asarray(im, np.float32) / 255.0).permute(2, 0, 1).contiguous()
                 for im in datasets.photos(names).values())


def blend_on_photos(X: torch.Tensor, seed: SeedLike = 0,
                    photos: Sequence[str] | None = None,
                    max_zoom: float = 4.0) -> torch.Tensor:
    """Blend each image of ``X`` over a random patch of a colour photo: the MNIST-M
    construction of Ganin et al. 2016 (JMLR 17(59), sect. 5.1.1), ``out = |patch - digit|``
    per pixel and channel.

    ``X`` ``[n, 1 or 3, H, W]`` in [0, 1] (a light digit on black) -> float32
    ``[n, 3, H, W]`` in [0, 1]. Where the digit is dark the photo shows through; where it is
    bright the photo's colours are inverted, so the digit's shape survives but its colours and
    background change from image to image.

    Ganin et al. cut 28x28 patches from the BSDS500 photos; here the photos are scikit-image's
    bundled ones (``photos``, default :data:`tlcourse.datasets.COLOUR_PHOTOS`, none of them
    BSDS500), and each patch is a random square of 1 to ``max_zoom`` times ``H`` pixels of a
    random photo, resized to ``H x W``, so that seven photos still give varied backgrounds.
    Deterministic by ``seed``.
    """
    from torchvision.ops import roi_align

    if X.ndim != 4 or X.shape[1] not in (1, 3):
        raise ValueError(f"blend_on_photos takes images [n, 1 or 3, H, W], got {tuple(X.shape)}.")
    names = tuple(datasets.COLOUR_PHOTOS if photos is None else photos)
    pics = _photo_tensors(names)
    n, _, H, W = X.shape
    rng = np.random.default_rng(seed)
    which = rng.integers(len(pics), size=n)
    zoom = np.exp(rng.uniform(0, np.log(max_zoom), n))
    u = rng.random((n, 2))
    out = torch.empty(n, 3, H, W)
    for p, pic in enumerate(pics):
        idx = np.flatnonzero(which == p)
        if not len(idx):
            continue
        ph, pw = pic.shape[1:]
        side_h = np.minimum(zoom[idx] * H, ph)
        side_w = np.minimum(zoom[idx] * W, pw)
        x0, y0 = u[idx, 0] * (pw - side_w), u[idx, 1] * (ph - side_h)
        boxes = torch.from_numpy(np.stack([np.zeros(len(idx)), x0, y0, x0 + side_w, y0 + side_h], 1)).float()
        # roi_align averages several samples per output pixel when the box is larger than the
        # output: a patch shrunk without aliasing, in one call per photo.
        patch = roi_align(pic[None], boxes, output_size=(H, W), spatial_scale=1.0,
                          sampling_ratio=-1, aligned=True)
        out[torch.from_numpy(idx)] = patch
    return (out - X.float()).abs_().clamp_(0, 1)


# ----------------------------------------------------------------------------- domains


def _stable(*parts) -> list[int]:
    """A seed sequence from ints, strings and nested sequences of them (crc32 for strings:
    unlike hash(), the same in every run)."""
    out = []
    for p in parts:
        if isinstance(p, (list, tuple)):
            out += _stable(*p)
        else:
            out.append(int(p) if isinstance(p, (int, np.integer)) else zlib.crc32(str(p).encode()))
    return out


def _stratified_split(y: np.ndarray, fraction: float, seed: SeedLike) -> tuple[np.ndarray, np.ndarray]:
    """Indices of two disjoint parts of ``y``: ``round(fraction * len(y))`` images with each
    class in proportion (within one), and the rest; both sorted."""
    # Written out (not sklearn's train_test_split) because it takes this module's SeedLike
    # seeds. Swapping it changes the splits: chapter 03's quick numbers depend on the split
    # (with sklearn's split DANN's gain fell inside the seed spread), so re-run the notebook.
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * fraction
    k = np.floor(exact).astype(int)
    # The images left over by rounding down go to the classes that lost most by it (ties at
    # random), so the first part has exactly the asked-for size whatever the class counts.
    short = int(round(len(y) * fraction)) - k.sum()
    k[np.lexsort((rng.random(len(k)), -(exact - k)))[:short]] += 1
    a, b = [], []
    for c, kc in zip(classes, k):
        idx = rng.permutation(np.flatnonzero(y == c))
        a.append(idx[:kc])
        b.append(idx[kc:])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


def _stratified_subset(y: np.ndarray, limit: int | None, seed: SeedLike) -> np.ndarray:
    if limit is None or limit >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    # Round-robin over classes in random order: as balanced as the classes allow.
    rank = np.empty(len(y), np.int64)
    for c in np.unique(y):
        members = order[y[order] == c]
        rank[members] = np.arange(len(members))
    pick = np.lexsort((rng.random(len(y)), rank))[:limit]
    return np.sort(pick)


@dataclass(frozen=True)
class _Base:
    """Images before a domain's style is applied: ``x`` ``[N, 1 or 3, size, size]`` in [0, 1],
    ``y`` ``[N]`` and ``ids`` ``[N]`` (index of each image in its base data set, for checks)."""

    x: torch.Tensor
    y: torch.Tensor
    ids: torch.Tensor


def _sklearn_base(split: str, size: int, seed: SeedLike, n: int | None, download: bool) -> _Base:
    X, y = handwritten_digits(size)
    # scikit-learn's digits have no official split: a stratified third is the test split.
    test, train = _stratified_split(y.numpy(), 1 / 3, _stable(seed, "sklearn-test-split"))
    idx = test if split == "test" else train
    return _Base(X[:, :1][idx], y[idx], torch.from_numpy(idx))


def _torchvision_arrays(name: str, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """A torchvision digit set as ``uint8 [N, C, H, W]`` and labels, read from the arrays the
    dataset holds (``.data``) instead of decoding 60,000 PIL images one by one."""
    ds = datasets.torchvision_dataset(name, split, download=download)
    data = getattr(ds, "data", None)
    labels = getattr(ds, "targets", getattr(ds, "labels", None))
    if data is not None and labels is not None:
        x = np.asarray(data)
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        return x, np.asarray(labels, np.int64)
    pairs = [(np.asarray(img), int(t)) for img, t in ds]
    x = np.stack([p for p, _ in pairs])
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return x, np.array([t for _, t in pairs], np.int64)


def _torchvision_base(name: str) -> Callable[..., _Base]:
    def base(split: str, size: int, seed: SeedLike, n: int | None, download: bool) -> _Base:
        x, y = _torchvision_arrays(name, split, download)
        idx = _stratified_subset(y, n, _stable(seed, name, split, "subset"))
        # In chunks: SVHN's 73,257 colour images as float32 before resizing would be 0.9 GB.
        xs = torch.cat([_resize(torch.from_numpy(np.ascontiguousarray(x[idx[i:i + 8192]])).float().div_(255), size)
                        for i in range(0, len(idx), 8192)]) if len(idx) else torch.empty(0, x.shape[1], size, size)
        return _Base(xs, torch.from_numpy(y[idx]), torch.from_numpy(idx))
    return base


def _syn_base(split: str, size: int, seed: SeedLike, n: int | None, download: bool) -> _Base:
    n = 10_000 if n is None else n
    if split == "test":
        n = max(10, n // 5)
    x, y = syn_digits(n, size, seed=_stable(seed, "syndigits", split))
    return _Base(x, y, torch.arange(n))


def _grey3(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _as_is(base: _Base, seed: SeedLike) -> torch.Tensor:
    return _grey3(base.x)


def _blended(base: _Base, seed: SeedLike) -> torch.Tensor:
    return blend_on_photos(base.x, seed=seed)


@dataclass(frozen=True)
class Domain:
    """One named digit domain: ``base`` says which images it is drawn from (two domains with
    the same base get disjoint images in a pair), ``style`` turns base images into the
    domain's ``[N, 3, size, size]`` images."""

    name: str
    description: str
    base: str
    online: bool
    citation: str
    load: Callable[..., _Base]
    style: Callable[[_Base, SeedLike], torch.Tensor] = _as_is


_GANIN = ("Y. Ganin, E. Ustinova, H. Ajakan, P. Germain, H. Larochelle, F. Laviolette, "
          "M. Marchand and V. Lempitsky, 'Domain-Adversarial Training of Neural Networks', "
          "JMLR 17(59), 2016.")

DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("syndigits", "digits rendered from matplotlib's fonts, random style (generated)",
           "syndigits", False, "Generated here, after the SynNumbers of " + _GANIN, _syn_base),
    Domain("digits", "scikit-learn's handwritten digits, 8x8 upsampled, white on black",
           "sklearn_digits", False, datasets.get("digits").citation, _sklearn_base),
    Domain("digits_m", "scikit-learn's digits blended onto patches of the bundled colour photos",
           "sklearn_digits", False, datasets.get("digits").citation + " Construction of " + _GANIN,
           _sklearn_base, _blended),
    Domain("mnist", "MNIST handwritten digits, white on black", "mnist", True,
           datasets.get("mnist").citation, _torchvision_base("mnist")),
    Domain("usps", "USPS postal digits, 16x16, white on black", "usps", True,
           datasets.get("usps").citation, _torchvision_base("usps")),
    Domain("svhn", "Street View house numbers, colour photos", "svhn", True,
           datasets.get("svhn").citation, _torchvision_base("svhn")),
    # Not Ganin et al.'s MNIST-M file (MNIST on BSDS500 patches): the same recipe on the
    # photos scikit-image bundles, so the numbers are comparable in spirit, not digit for digit.
    Domain("mnist_m", "MNIST blended onto patches of the bundled colour photos (MNIST-M recipe, "
           "not the original BSDS500 file)", "mnist", True,
           datasets.get("mnist").citation + " Construction of " + _GANIN,
           _torchvision_base("mnist"), _blended),
)}


def list_domains(online: bool | None = None) -> list[str]:
    """Domain names, sorted; only the offline (``online=False``) or online ones if given."""
    return sorted(n for n, d in DOMAINS.items() if online is None or d.online == online)


def _domain(name: str) -> Domain:
    try:
        return DOMAINS[name]
    except KeyError:
        raise ValueError(f"No digit domain named {name!r}. Offline: "
                         f"{', '.join(list_domains(False))}; online (downloaded, full profile): "
                         f"{', '.join(list_domains(True))}.") from None


@dataclass
class DomainPair:
    """A source and a target domain, ready to train on.

    Every dataset is a ``TensorDataset`` of ``(x, y)``: ``x`` float32 ``[3, size, size]`` in
    [0, 1] (not normalised: a model that wants ``[-1, 1]`` does ``x * 2 - 1`` itself, the same
    for both domains, so no per-domain statistics leak into the comparison), ``y`` int64 0-9.

    - ``source_train``: labelled; the only labels an adaptation method may train on.
    - ``target_train``: the target images an adaptation method sees. Their labels are kept
      only to train the "oracle" (the upper bound that cheats) and must not be read by the
      method itself: use ``target_train.tensors[0]``.
    - ``target_test``: labelled target images for evaluation only, disjoint from target_train.
    - ``source_test``: held-out source images, to show the source task was learnt. With a
      shared base it is drawn from the same test split as ``target_test`` (both are for
      evaluation only, so nothing leaks into training).

    When both domains are drawn from the same base images (``digits`` -> ``digits_m``,
    ``mnist`` -> ``mnist_m``), source and target training images come from disjoint stratified
    halves of the base training split: otherwise the target would be the source in disguise.
    ``ids["source_train"]`` etc. give the index of each image in its base data set's split
    (for SynDigits, its index in the generated set), so this can be checked.
    """

    source: str
    target: str
    size: int
    seed: int
    source_train: TensorDataset
    source_test: TensorDataset
    target_train: TensorDataset
    target_test: TensorDataset
    classes: list[str]
    ids: dict[str, torch.Tensor]

    def __str__(self) -> str:
        n = {k: len(getattr(self, k)) for k in ("source_train", "source_test", "target_train",
                                                 "target_test")}
        return (f"{self.source} -> {self.target} at {self.size} px (seed {self.seed}): "
                + ", ".join(f"{k} {v}" for k, v in n.items()))


def domain_pair(source: str, target: str, size: int = 28, seed: int = 0, *,
                n_syn: int = 10_000, limit: int | None = None,
                download: bool = True) -> DomainPair:
    """Build the source and target datasets of one domain-adaptation experiment.

    ``source``/``target``: names from :data:`DOMAINS` (:func:`list_domains`). ``size``: image
    side in pixels. ``seed``: the split, the generated images and the photo patches.
    ``n_syn``: SynDigits training images (a fifth as many for its test split). ``limit``: at
    most this many images per split of an online domain (a class-balanced random subset; the
    quick profile does not need 60,000 MNIST digits). ``download``: whether an online domain
    may be downloaded when missing.

    scikit-learn's digits (1,797) are split, stratified by seed, into a test third (599) and a
    training rest (1,198); MNIST, USPS and SVHN use their official splits. A base shared by
    source and target has its training split halved (599 + 599 for the scikit-learn digits).

    Raises:
        ValueError: an unknown domain name (the message lists the known ones).
        tlcourse.datasets.DatasetUnavailable: an online domain is not on disk and cannot be
            downloaded now (the message says where to put it).
    """
    src, tgt = _domain(source), _domain(target)
    shared = src.base == tgt.base

    def part(dom: Domain, split: str, half: str | None) -> tuple[TensorDataset, torch.Tensor]:
        n = n_syn if dom.base == "syndigits" else limit
        # Synthetic halves are simply independent draws; real ones are split below.
        split_seed = _stable(seed, split, half or "all") if dom.base == "syndigits" else seed
        base = dom.load(split, size, split_seed, n, download)
        if half is not None and dom.base != "syndigits":
            a, b = _stratified_split(base.y.numpy(), 0.5, _stable(seed, dom.base, "halves"))
            keep = torch.from_numpy(a if half == "a" else b)
            base = _Base(base.x[keep], base.y[keep], base.ids[keep])
        x = dom.style(base, _stable(seed, dom.name, split, half or "all", "style"))
        return TensorDataset(x, base.y), base.ids

    parts = {"source_train": part(src, "train", "a" if shared else None),
             "source_test": part(src, "test", None),
             "target_train": part(tgt, "train", "b" if shared else None),
             "target_test": part(tgt, "test", None)}
    return DomainPair(source, target, size, seed, *(parts[k][0] for k in parts),
                      classes=list(CLASSES), ids={k: v[1] for k, v in parts.items()})
