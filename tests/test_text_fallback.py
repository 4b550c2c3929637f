"""datasets.chat_topics: the text chapter's bundled, always-offline fallback for BANKING77
(chatbot questions by topic, read from the chatterbot-corpus package)."""

from __future__ import annotations

import sys
import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tlcourse import datasets as ds

ROOT = Path(__file__).resolve().parents[1]

chatterbot_corpus = pytest.importorskip("chatterbot_corpus", reason="chatterbot-corpus is not installed")
# The exact numbers below are measured on this release; other releases hold other files.
on_measured_release = pytest.mark.skipif(chatterbot_corpus.__version__ != "1.3.3",
                                         reason="counts measured on chatterbot-corpus 1.3.3")

TOPICS = ["ai", "coding", "conversations", "emotion", "literature", "movies", "psychology",
          "science", "sports", "trivia"]


@pytest.fixture
def fresh_cache():
    ds._chat_topics_all.cache_clear()
    yield
    ds._chat_topics_all.cache_clear()


@on_measured_release
def test_split_sizes_and_classes():
    train, test = ds.chat_topics("train"), ds.chat_topics("test")
    assert (len(train.texts), len(test.texts)) == (483, 161)
    assert train.classes == test.classes == TOPICS
    per_topic = Counter(np.r_[train.labels, test.labels].tolist())
    assert [per_topic[i] for i in range(len(TOPICS))] == [60, 96, 20, 48, 29, 23, 62, 23, 22, 261]
    texts, labels, _ = ds._chat_topics_all(20)      # the package's order, topic by topic
    assert (texts[0], labels[0]) == ("What is AI?", TOPICS.index("ai"))
    assert labels[-1] == TOPICS.index("trivia")


def test_types_and_every_topic_on_both_sides():
    train, test = ds.chat_topics("train"), ds.chat_topics("test")
    for s in (train, test):
        assert isinstance(s, ds.TextSplit) and len(s.texts) == len(s.labels)
        assert s.labels.dtype == np.int64
        assert set(s.labels.tolist()) == set(range(len(s.classes)))   # stratified: all topics
    assert len(train.classes) >= 5
    counts = Counter(np.r_[train.labels, test.labels].tolist())
    assert min(counts.values()) >= 20                                  # min_per_class
    # Stratified: each topic sends about a quarter of its texts to test.
    test_counts = Counter(test.labels.tolist())
    for label, n in counts.items():
        assert abs(test_counts[label] - 0.25 * n) <= 1


def test_no_empty_texts_and_no_duplicates():
    train, test = ds.chat_topics("train"), ds.chat_topics("test")
    texts = train.texts + test.texts
    assert all(isinstance(t, str) and t and t == " ".join(t.split()) for t in texts)
    keys = [t.casefold() for t in texts]
    assert len(set(keys)) == len(keys)


def test_train_and_test_are_disjoint_and_cover_everything():
    for seed in (0, 1):
        train, test = ds.chat_topics("train", seed=seed), ds.chat_topics("test", seed=seed)
        assert not set(train.texts) & set(test.texts)
        everything = ds._chat_topics_all(20)[0]
        assert sorted(train.texts + test.texts) == sorted(everything)


def test_the_split_is_fixed_by_the_seed():
    a, b = ds.chat_topics("test", seed=3), ds.chat_topics("test", seed=3)
    assert a.texts == b.texts and np.array_equal(a.labels, b.labels)
    other = ds.chat_topics("test", seed=4)
    assert other.texts != a.texts and len(other.texts) == len(a.texts)
    assert Counter(other.labels.tolist()) == Counter(a.labels.tolist())   # same strata


@on_measured_release
def test_ambiguous_openers_are_dropped_and_small_topics_left_out():
    texts = ds._chat_topics_all(20)[0]
    assert "Hello" not in texts            # opens both a 'conversations' and a 'greetings' dialog
    assert "can you write bubble sort?" in texts
    big = ds.chat_topics("train", min_per_class=50)
    assert big.classes == ["ai", "coding", "psychology", "trivia"]


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="'train' and 'test'"):
        ds.chat_topics("val")


def test_missing_package_names_what_to_install(monkeypatch, fresh_cache):
    monkeypatch.setitem(sys.modules, "chatterbot_corpus", None)   # import now raises ImportError
    with pytest.raises(ds.DatasetUnavailable) as err:
        ds.chat_topics("train")
    msg = str(err.value)
    assert err.value.name == "chat_topics"
    assert "pip install 'chatterbot-corpus>=1.3.3'" in msg and "not installed" in msg
    assert "bundled data" in msg and "nothing is downloaded" in msg
    assert "TLCOURSE_DATA" not in msg      # no folder to place: installing is the fix


def test_a_package_without_english_files_is_refused(monkeypatch, tmp_path, fresh_cache):
    fake = tmp_path / "chatterbot_corpus"
    (fake / "data" / "english").mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.0.0'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "chatterbot_corpus", raising=False)
    with pytest.raises(ds.DatasetUnavailable, match="chatterbot-corpus 0.0.0 has no English topic"):
        ds.chat_topics("test")


def test_banking77_offline_names_the_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("TLCOURSE_DATA", str(tmp_path))
    with pytest.raises(ds.DatasetUnavailable) as err:
        ds.banking77("train", download=False)
    assert "the bundled dataset 'chat_topics'" in str(err.value)


def test_the_package_is_a_declared_dependency():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("chatterbot-corpus") for d in deps)
    assert any(d.lower().startswith("pyyaml") for d in deps)
