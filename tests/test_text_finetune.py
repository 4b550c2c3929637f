"""tlcourse.text_finetune: fine-tuning the real all-MiniLM-L6-v2 (full and LoRA) on a few labels.

Small made-up intents keep each run to seconds on a CPU; the chapter measures BANKING77.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tlcourse import text, text_finetune

TEXTS = [
    "my card has not arrived yet", "when will my new card come", "still waiting for the card in the post",
    "the card you sent never showed up",
    "what is the exchange rate today", "how much is one euro in pounds", "which rate do you use to convert",
    "is the rate for dollars good",
    "I forgot my passcode", "how do I reset my pin", "my pin is blocked after three tries",
    "change the pin on my card",
]
LABELS = ["card_arrival"] * 4 + ["exchange_rate"] * 4 + ["pin"] * 4


@pytest.fixture(scope="module")
def encoder():
    return text.load_encoder()


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_before_training_the_classifier_is_the_nearest_centroid(encoder):
    x = text.embed(TEXTS, encoder)
    centroid = text.nearest_centroid(x, LABELS)
    model = text_finetune.SentenceClassifier(copy.deepcopy(encoder.model), centroid.centroids).eval()
    with torch.no_grad():
        logits = model(**text.tokenize(TEXTS, encoder))                        # [12, 3]
    expected = text_finetune.SCALE * centroid.similarities(x)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert (centroid.classes_[logits.argmax(1).numpy()] == centroid.predict(x)).all()


def test_lora_goes_on_every_query_and_value_projection(encoder):
    names = text_finetune.lora_targets(encoder.model)
    assert len(names) == 12 and all(n.endswith((".query", ".value")) for n in names)


@pytest.mark.parametrize("method", text_finetune.METHODS)
def test_fine_tune_trains_a_copy_and_returns_a_plain_encoder(encoder, method):
    before = _weights(encoder.model)
    tuned = text_finetune.fine_tune(TEXTS, LABELS, method=method, epochs=2, batch_size=4, seed=0, encoder=encoder)
    after = _weights(encoder.model)
    assert all(torch.equal(before[k], after[k]) for k in before)                # the shared encoder is untouched
    assert type(tuned.encoder.model) is type(encoder.model) and not tuned.encoder.model.training
    assert not any("lora" in k for k in tuned.encoder.model.state_dict())      # merged: no adapters left
    changed = [k for k, v in tuned.encoder.model.state_dict().items() if not torch.equal(v, before[k])]
    head = 3 * text.EMBEDDING_DIM
    if method == "lora":
        per_layer = 2 * (2 * 8 * text.EMBEDDING_DIM)                            # query and value: A and B, rank 8
        assert tuned.trainable == 6 * per_layer + head
        assert changed and all(k.endswith(("query.weight", "value.weight")) for k in changed)
    else:
        pooler = sum(p.numel() for p in encoder.model.pooler.parameters())      # mean pooling never reads it
        assert tuned.trainable == sum(p.numel() for p in encoder.model.parameters()) - pooler + head
        assert all(any(f"layer.{i}." in k for k in changed) for i in range(6))  # every layer moved
        assert not any(k.startswith("pooler") for k in changed)
    prototypes = text.nearest_centroid(text.embed(TEXTS, encoder), LABELS).centroids
    assert not torch.allclose(tuned.classifier.centroids, prototypes, atol=1e-4)  # the trained head, kept by the merge
    assert len(tuned.losses) == 2 and all(np.isfinite(tuned.losses))
    assert set(tuned.predict(["where is my card"])) <= set(LABELS)
    assert tuned.encoder.weights_sha256 == ""


def test_same_seed_same_run_other_seed_other_batches(encoder):
    state = torch.get_rng_state()
    runs = [text_finetune.fine_tune(TEXTS, LABELS, method="lora", epochs=1, batch_size=4, seed=s, encoder=encoder)
            for s in (3, 3, 4)]
    assert torch.equal(state, torch.get_rng_state())                            # the caller's random state kept
    assert runs[0].losses == runs[1].losses and runs[0].losses != runs[2].losses
    torch.testing.assert_close(runs[0].embed(TEXTS[:2]), runs[1].embed(TEXTS[:2]), atol=0, rtol=0)


def test_training_lowers_the_loss_on_hard_made_up_labels(encoder):
    # Labels that cut across meaning (first half of each intent vs second half): the prototypes
    # start near chance, so the loss has room to fall.
    labels = ["a", "a", "b", "b"] * 3
    tuned = text_finetune.fine_tune(TEXTS, labels, method="full", epochs=6, batch_size=4, lr=1e-4,
                                    seed=0, encoder=encoder)
    assert tuned.losses[-1] < 0.5 * tuned.losses[0]
    assert tuned.score(TEXTS, labels) > 0.9                                    # it memorises its training set


def test_the_tuned_encoder_never_touches_the_embedding_cache(encoder, tmp_path):
    tuned = text_finetune.fine_tune(TEXTS[:6], LABELS[:6], method="lora", epochs=1, batch_size=6, seed=0,
                                    encoder=encoder)
    x = text.cached_embed(TEXTS[:3], tuned.encoder, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    torch.testing.assert_close(x, tuned.embed(TEXTS[:3]))


def test_bad_arguments_are_refused(encoder):
    with pytest.raises(ValueError, match="method"):
        text_finetune.fine_tune(TEXTS, LABELS, method="adapter", encoder=encoder)
    with pytest.raises(ValueError, match="12 texts but 11 labels"):
        text_finetune.fine_tune(TEXTS, LABELS[:-1], encoder=encoder)
    with pytest.raises(ValueError, match="two classes"):
        text_finetune.fine_tune(TEXTS[:4], LABELS[:4], encoder=encoder)
    with pytest.raises(ValueError, match="at least 1"):
        text_finetune.fine_tune(TEXTS, LABELS, epochs=0, encoder=encoder)
