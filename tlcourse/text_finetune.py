"""Fine-tuning the sentence encoder with a few labels: every weight, or LoRA adapters.

Chapter 07 first freezes all-MiniLM-L6-v2 (:mod:`tlcourse.text`) and fits a classifier on its
embeddings. Here the encoder itself trains. The classifier on top is a **cosine classifier**
whose weight rows start at the classes' prototypes (the nearest-centroid classifier of
:func:`tlcourse.text.nearest_centroid`): before the first step the model *is* the nearest-centroid
classifier, so what training adds is measured from a known point, and the new head does not
push random gradients into the pretrained weights in the first steps (the reason for LP-FT,
Kumar et al. 2022, chapter 06).

Two ways to train it, on one budget (same start, batches, epochs and schedule):

- ``"full"``: every weight of the transformer and the head;
- ``"lora"``: LoRA adapters (Hu et al. 2022) on the attention's query and value projections,
  through Hugging Face ``peft`` (:func:`tlcourse.efficient.add_lora`, chapter 06's code), plus
  the head; merged into the weights afterwards, so the tuned encoder is a plain model again.

Typical use::

    from tlcourse import text, text_finetune
    tuned = text_finetune.fine_tune(texts, labels, method="lora", seed=0)
    tuned.score(test_texts, test_labels)
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import efficient, finetune, text

__all__ = ["SCALE", "METHODS", "LEARNING_RATES", "HEAD_LR", "SentenceClassifier", "lora_targets", "TunedEncoder",
           "fine_tune"]

# Cosines lie in [-1, 1]; a softmax over 77 of them would stay nearly uniform. Multiplying by 20
# (a temperature of 0.05) lets the loss become confident; 20 is also the scale
# sentence-transformers' MultipleNegativesRankingLoss uses on the same kind of cosines.
SCALE = 20.0
METHODS = ("full", "lora")
# Common starting points, not tuned on this data: a small step when every pretrained weight moves
# (Devlin et al. 2019 searched 2e-5 to 5e-5 for BERT), a larger one when only a few new weights
# train (chapter 06 likewise). The head is new in both arms and gets HEAD_LR in both, so the arms
# differ only in what they change inside the encoder.
LEARNING_RATES = {"full": 3e-5, "lora": 2e-3}
HEAD_LR = 2e-3


class SentenceClassifier(nn.Module):
    """The transformer, masked mean pooling, and a cosine classifier: word pieces -> logits.

    ``head.weight`` ``[C, 384]`` holds one row per class (started at the class prototypes);
    the logits are ``SCALE`` times the cosine between the sentence embedding and each row.
    """

    def __init__(self, transformer: nn.Module, prototypes: torch.Tensor, scale: float = SCALE):
        super().__init__()
        self.transformer = transformer
        # BERT's pooler (a dense layer on [CLS]) is not read by mean pooling: frozen, so that it
        # neither counts as trained nor sits in the optimizer.
        pooler = getattr(transformer, "pooler", None)
        if pooler is not None:
            pooler.requires_grad_(False)
        self.head = nn.Linear(prototypes.shape[1], prototypes.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(prototypes)
        self.scale = scale

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-length sentence embeddings ``[B, 384]`` from word pieces ``[B, L]``."""
        tokens = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state      # [B, L, 384]
        return F.normalize(text.mean_pool(tokens, attention_mask), dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, C]``."""
        z = self.embed(input_ids, attention_mask, token_type_ids)
        return self.scale * z @ F.normalize(self.head.weight, dim=-1).T


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the attention's query and value projections (``nn.Linear``), where Hu et al.
    (2022) put LoRA; 12 in MiniLM-L6's six layers."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ("query", "value")]


@dataclass
class TunedEncoder:
    """What :func:`fine_tune` returns.

    ``encoder``: the tuned transformer with the original tokenizer (an :class:`text.Encoder`,
    usable with :func:`text.embed`; its ``weights_sha256`` is cleared, so it never reads or
    writes the pretrained model's embedding cache); ``classifier``: the trained head as unit
    prototypes ``[C, 384]`` (a :class:`text.NearestCentroid`); ``trainable``: values the
    optimizer updated (the head's included); ``losses``: the training loss of each epoch;
    ``seconds``: training time.
    """

    method: str
    encoder: text.Encoder
    classifier: text.NearestCentroid
    trainable: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    def embed(self, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        """Unit-length embeddings by the tuned encoder: ``N`` texts -> ``[N, 384]``."""
        return text.embed(texts, self.encoder, batch_size=batch_size)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Labels ``[N]`` (as given in training) of ``N`` texts."""
        return self.classifier.predict(self.embed(texts))

    def score(self, texts: Sequence[str], labels) -> float:
        """Accuracy on ``texts`` with true ``labels [N]``."""
        return float(np.mean(self.predict(texts) == np.asarray(labels)))


def fine_tune(texts: Sequence[str], labels, method: str = "full", epochs: int = 4,
              lr: float | None = None, batch_size: int = 16, rank: int = 8, warmup: float = 0.1,
              weight_decay: float = 0.01, seed: int = 0, encoder: text.Encoder | None = None,
              device: torch.device | str = "cpu", progress: bool = False) -> TunedEncoder:
    """Fine-tune a copy of the sentence encoder on ``texts`` with ``labels [N]`` (any integers
    or strings); the shared pretrained encoder is left untouched.

    The head starts at the prototypes of the frozen embeddings; AdamW with ``lr`` for the
    encoder's trainable weights (default :data:`LEARNING_RATES`) and :data:`HEAD_LR` for the
    head in both methods, linear warm-up over ``warmup`` of the steps then cosine decay
    (chapter 02's schedule), cross-entropy, dropout on as in pretraining. The batch order and
    the dropout masks come from ``seed`` alone, so two methods with one seed see the same batches
    in the same order, LoRA's adapters start alike for one seed, a run repeats exactly, and the
    caller's global random state is left as it was.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be at least 1, not {epochs} and {batch_size}")
    texts = list(texts)
    labels = np.asarray(labels)
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if len(np.unique(labels)) < 2:
        raise ValueError("fine-tuning a classifier needs at least two classes")
    encoder = encoder or text.load_encoder()
    classes, y = np.unique(labels, return_inverse=True)
    frozen = text.nearest_centroid(text.embed(texts, encoder), y)                  # [C, 384] prototypes
    # LoRA's initial A, dropout and the batch order draw random numbers: from the seed alone, in a
    # forked random state (the GPU's too: manual_seed reseeds it), so the caller's is left as it was.
    dev = torch.device(device)
    gpus = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        model = SentenceClassifier(copy.deepcopy(encoder.model), frozen.centroids)
        if method == "lora":   # alpha = rank (a scale of 1), as in chapter 06
            model = efficient.add_lora(model, rank=rank, targets=lora_targets(model))
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        head = [p for n, p in model.named_parameters() if p.requires_grad and "head" in n.split(".")]
        body = [p for p in params if all(p is not h for h in head)]
        optimizer = torch.optim.AdamW([{"params": body, "lr": LEARNING_RATES[method] if lr is None else lr},
                                       {"params": head, "lr": HEAD_LR}], weight_decay=weight_decay)
        steps_per_epoch = -(-len(texts) // batch_size)
        total = epochs * steps_per_epoch
        scheduler = finetune.warmup_cosine(optimizer, total, min(int(warmup * total), total - 1))
        losses, seconds = _train(model, optimizer, scheduler, texts, torch.as_tensor(y), encoder, epochs,
                                 batch_size, torch.Generator().manual_seed(seed), device, method, progress)
    trainable = sum(p.numel() for p in params)
    if method == "lora":
        model = efficient.merge_lora(model)
    model.eval()
    tuned = dataclasses.replace(encoder, model=model.transformer, weights_sha256="")
    head = text.NearestCentroid(F.normalize(model.head.weight.detach().float().cpu(), dim=-1), classes)
    return TunedEncoder(method, tuned, head, trainable, seconds, losses)


def _train(model, optimizer, scheduler, texts, targets, encoder, epochs, batch_size, generator, device,
           method, progress) -> tuple[list[float], float]:
    """The loop: mean training loss of each epoch, and the seconds it took."""
    losses = []
    start = time.perf_counter()
    for _ in tqdm(range(epochs), desc=f"fine-tuning ({method})", leave=False, disable=not progress):
        running = 0.0
        for idx in torch.randperm(len(texts), generator=generator).split(batch_size):
            batch = {k: v.to(device) for k, v in text.tokenize([texts[i] for i in idx.tolist()], encoder).items()}
            loss = F.cross_entropy(model(**batch), targets[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(idx)
        losses.append(running / len(texts))
    return losses, time.perf_counter() - start
