"""tlcourse.datasets: data folder, registry, locate/fetch/verify, image folders, bundled data.

Everything runs on small trees of generated PNGs in tmp_path, served by a local HTTP server
when a download is needed, so no test depends on the internet or on the shared mirror.
The mirror (../shared/data beside the repo) is used too when present, as CI has it.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import shutil
import socket
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlcourse import datasets as ds
from tlcourse import download as dl

MIRROR = Path(__file__).resolve().parents[2] / "shared" / "data"
CLASSES = ("ants", "bees")


# ----------------------------------------------------------------------------- helpers


def _png(path: Path, colour=(200, 30, 30), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _fake_tree(root: Path) -> Path:
    """A hymenoptera-shaped tree: {train,val}/{ants,bees}/ with 2 tiny PNGs each (8 files)."""
    for split in ("train", "val"):
        for i, cls in enumerate(CLASSES):
            for j in range(2):
                _png(root / split / cls / f"{j}.png", colour=(40 * i, 90 * j, 100))
    return root


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path):
    """(folder, base URL): a static file server for a fresh folder."""
    folder = tmp_path / "www"
    folder.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01},
                     daemon=True).start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def data(tmp_path, monkeypatch):
    """An empty data folder that TLCOURSE_DATA points at (not yet created)."""
    root = tmp_path / "data"
    monkeypatch.setenv("TLCOURSE_DATA", str(root))
    # No backoff sleeps: retries stay real, the tests stay fast.
    monkeypatch.setattr(ds, "download", functools.partial(dl.download, backoff=0.0, progress=False))
    return root


@pytest.fixture
def fake(tmp_path, http_dir, monkeypatch):
    """Register dataset "fake": a zip of a fake tree served locally, with its sha256, file
    count and content digest. Returns (info, the reference tree)."""
    www, url = http_dir
    ref = _fake_tree(tmp_path / "ref" / "fake_data")
    archive = www / "fake_data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(ref.rglob("*")):
            zf.write(p, p.relative_to(ref.parent).as_posix())
        zf.writestr("__MACOSX/fake_data/._junk", b"mac junk")  # as zips made on a Mac have
    info = ds.DatasetInfo(
        name="fake", kind="archive", description="a test tree", citation="-", licence="-",
        urls=(f"{url}/fake_data.zip",), sha256=dl.sha256sum(archive), folder="fake_data",
        layout="fake_data/{train,val}/{ants,bees}/*.png", archive_root="fake_data",
        files=8, digest=ds.tree_digest(ref), fallback="digits",
    )
    monkeypatch.setitem(ds.DATASETS, "fake", info)
    return info, ref


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/fake_data.zip"


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


# ----------------------------------------------------------------------------- data folder


def test_data_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("TLCOURSE_DATA", str(tmp_path / "mine"))
    monkeypatch.setenv("COLAB_RELEASE_TAG", "x")
    assert ds.data_dir() == tmp_path / "mine"  # the variable wins everywhere
    monkeypatch.delenv("TLCOURSE_DATA")
    assert ds.data_dir() == Path("/content/tlcourse_data")
    monkeypatch.delenv("COLAB_RELEASE_TAG")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert ds.data_dir() == tmp_path / "cache" / "tlcourse"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ds.data_dir() == Path.home() / ".cache" / "tlcourse"
    assert not (tmp_path / "mine").exists() and not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- registry


def test_registry_has_the_course_datasets():
    expected = {"hymenoptera": "archive", "digits": "bundled", "photos": "bundled",
                "lfw_subset": "bundled", "mnist": "torchvision", "usps": "torchvision",
                "svhn": "torchvision", "cifar10": "torchvision", "oxford_pets": "torchvision",
                "flowers102": "torchvision", "banking77": "files", "chat_topics": "bundled"}
    for name, kind in expected.items():
        info = ds.get(name)
        assert info.kind == kind and info.citation and info.licence and info.description
        if kind != "bundled":
            assert info.urls and info.folder and info.layout
    assert set(ds.list_datasets("bundled")) == {"digits", "photos", "lfw_subset", "chat_topics"}


def test_register_refuses_duplicates_and_unknown_names_are_explained(monkeypatch):
    monkeypatch.setattr(ds, "DATASETS", dict(ds.DATASETS))
    with pytest.raises(ValueError, match="already registered"):
        ds.register(ds.get("mnist"))
    ds.register(dataclasses.replace(ds.get("mnist"), description="changed"), overwrite=True)
    assert ds.get("mnist").description == "changed"
    with pytest.raises(ValueError, match="Did you mean 'hymenoptera'"):
        ds.get("hymenopter")
    with pytest.raises(ValueError, match="kind"):
        ds.register(dataclasses.replace(ds.get("digits"), name="x", kind="zip"))


# ----------------------------------------------------------------------------- locate / fetch / verify


def test_locate_finds_a_present_tree_without_writing(data, fake):
    info, ref = fake
    shutil.copytree(ref, data / "fake_data")
    before = _listing(data)
    assert ds.locate("fake") == data / "fake_data"
    assert ds.verify("fake").state == "ok"
    assert _listing(data) == before


def test_offline_and_missing_gives_one_clear_paragraph(data, fake, monkeypatch):
    info, _ = fake
    url = _closed_port_url()
    monkeypatch.setitem(ds.DATASETS, "fake", dataclasses.replace(info, urls=(url,)))
    with pytest.raises(ds.DatasetUnavailable) as err:
        ds.locate("fake")
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("'fake'", str(data / "fake_data"), url, "TLCOURSE_DATA",
                 "fake_data/{train,val}/{ants,bees}/*.png", "fall back", "'digits'"):
        assert part in msg, part
    assert "refused" in msg.lower()  # the reason, in short
    assert (err.value.name, err.value.path, err.value.url) == ("fake", data / "fake_data", url)
    assert _listing(data) == []  # no partial archive, no temp folder


def test_locate_without_download_does_not_touch_the_network(data, fake):
    with pytest.raises(ds.DatasetUnavailable, match="downloading was not allowed"):
        ds.locate("fake", download=False)
    assert not data.exists()


def test_download_and_extract_into_an_empty_data_folder(data, fake):
    info, ref = fake
    path = ds.locate("fake")
    assert path == data / "fake_data"
    assert ds.tree_digest(path) == info.digest
    assert _listing(data) == ["fake_data"] + [f"fake_data/{p}" for p in _listing(ref)]
    status = ds.verify("fake")
    assert status.state == "ok" and "8 files" in status.message


def test_archive_checksum_mismatch_is_not_used(data, fake, monkeypatch):
    info, _ = fake
    monkeypatch.setitem(ds.DATASETS, "fake", dataclasses.replace(info, sha256="0" * 64))
    with pytest.raises(ds.DatasetUnavailable, match="checksum mismatch"):
        ds.locate("fake")
    assert _listing(data) == []


def test_fresh_download_not_matching_the_digest_is_removed(data, fake, monkeypatch):
    info, _ = fake
    monkeypatch.setitem(ds.DATASETS, "fake", dataclasses.replace(info, digest="sha256:" + "0" * 64))
    with pytest.raises(ds.DatasetCorrupt, match="failed its check"):
        ds.locate("fake")
    assert _listing(data) == []


def test_read_only_data_folder_is_reported(data, fake, monkeypatch):
    data.mkdir()
    monkeypatch.setattr(ds.os, "access", lambda *a: False)  # root ignores chmod, so fake it
    with pytest.raises(ds.DatasetUnavailable, match="read-only"):
        ds.locate("fake")
    assert _listing(data) == []


def test_verify_missing_ok_corrupt(data, fake, monkeypatch):
    info, ref = fake
    st = ds.verify("fake")
    assert (st.state, st.path) == ("missing", data / "fake_data")
    assert "tlcourse data fetch fake" in st.message

    tree = shutil.copytree(ref, data / "fake_data")
    (tree / ".DS_Store").write_bytes(b"finder junk")  # junk does not count
    assert ds.verify("fake").state == "ok"

    # Same size, one byte changed: only the content digest can see it.
    victim = tree / "val" / "bees" / "1.png"
    raw = bytearray(victim.read_bytes())
    raw[-5] ^= 0xFF
    victim.write_bytes(bytes(raw))
    st = ds.verify("fake")
    assert st.state == "corrupt" and "content digest" in st.message and "fetch fake" in st.message
    assert ds.locate("fake") == tree  # the cheap check in locate counts files only

    # A truncated image: the message names it.
    victim.write_bytes(victim.read_bytes()[:40])
    st = ds.verify("fake")
    assert st.state == "corrupt" and "val/bees/1.png" in st.message

    # A missing file: both verify and locate refuse it.
    victim.unlink()
    assert "7 files instead of 8" in ds.verify("fake").message
    with pytest.raises(ds.DatasetCorrupt, match="7 files"):
        ds.locate("fake")


def test_fetch_replaces_a_corrupt_copy(data, fake):
    info, ref = fake
    tree = shutil.copytree(ref, data / "fake_data")
    (tree / "train" / "ants" / "0.png").unlink()
    assert ds.verify("fake").state == "corrupt"
    assert ds.fetch("fake") == tree
    assert ds.verify("fake").state == "ok"
    assert _listing(data)[0] == "fake_data" and all(p.startswith("fake_data") for p in _listing(data))


def test_status_all_covers_every_dataset(data):
    states = {s.name: s.state for s in ds.status_all()}
    assert set(states) == set(ds.DATASETS)
    assert states["digits"] == "bundled" and states["hymenoptera"] == "missing"


def test_tree_digest_sees_renames(tmp_path):
    a = _fake_tree(tmp_path / "a")
    before = ds.tree_digest(a)
    (a / "train" / "ants" / "0.png").rename(a / "train" / "ants" / "9.png")
    assert ds.tree_digest(a) != before


@pytest.mark.skipif(not (MIRROR / "hymenoptera_data").is_dir(),
                    reason="the shared data mirror is not beside the repo")
def test_mirror_hymenoptera(monkeypatch):
    monkeypatch.setenv("TLCOURSE_DATA", str(MIRROR))
    assert ds.locate("hymenoptera", download=False) == MIRROR / "hymenoptera_data"
    assert ds.verify("hymenoptera").state == "ok"  # the registered digest is the mirror's
    train, val = ds.hymenoptera("train"), ds.hymenoptera("val")
    assert (len(train), len(val)) == (244, 153)  # the PyTorch tutorial's dataset sizes
    assert train.classes == ["ants", "bees"]


def test_hymenoptera_from_a_fake_tree(data, fake, monkeypatch):
    """The same code path as the mirror test, on a tree that always exists."""
    info, ref = fake
    monkeypatch.setitem(ds.DATASETS, "hymenoptera",
                        dataclasses.replace(ds.get("hymenoptera"), folder="fake_data", files=8,
                                            digest=info.digest))
    shutil.copytree(ref, data / "fake_data")
    train = ds.hymenoptera("train", transform=np.asarray)
    x, y = train[3]
    assert train.classes == list(CLASSES) and len(train) == 4
    assert x.shape == (8, 8, 3) and y == 1
    with pytest.raises(ValueError, match="'train' and 'val'"):
        ds.hymenoptera("test")


# ----------------------------------------------------------------------------- image folders


def _two_classes(root: Path, n=2) -> Path:
    for cls in ("cats", "dogs"):
        for j in range(n):
            _png(root / cls / f"{j}.png")
    return root


def test_image_folder_reads_a_good_folder_and_ignores_hidden_folders(tmp_path):
    root = _two_classes(tmp_path / "pets")
    _png(root / ".ipynb_checkpoints" / "x.png")  # Jupyter's folder must not become a class
    folder = ds.image_folder(root, transform=np.asarray)
    assert folder.classes == ["cats", "dogs"] and len(folder) == 4
    x, y = folder[0]
    assert x.shape == (8, 8, 3) and y == 0


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("file", "is a file, not a folder"),
    ("no_subfolders", "has no subfolders"),
    ("one_class", "only one class folder ('cats')"),
    ("empty_class", "'dogs'"),
    ("loose_images", "put them in class subfolders"),
])
def test_image_folder_errors_say_what_to_do(tmp_path, case, expected):
    root = tmp_path / "imgs"
    if case == "file":
        root.write_text("not a folder")
    elif case == "no_subfolders":
        root.mkdir()
        (root / "notes.txt").write_text("hello")
    elif case == "one_class":
        _png(root / "cats" / "0.png")
    elif case == "empty_class":
        _png(root / "cats" / "0.png")
        (root / "dogs").mkdir()
        (root / "dogs" / "readme.txt").write_text("no images here")
    elif case == "loose_images":
        _two_classes(root)
        _png(root / "stray.png")
    with pytest.raises(ds.ImageFolderError) as err:
        ds.image_folder(root)
    assert expected in str(err.value)
    assert str(root) in str(err.value)


def test_non_image_files_are_skipped_with_a_warning(tmp_path):
    root = _two_classes(tmp_path / "pets")
    (root / "cats" / "notes.txt").write_text("x")
    with pytest.warns(UserWarning, match=r"Skipping 1 file.*cats/notes\.txt"):
        folder = ds.image_folder(root)
    assert len(folder) == 4


def test_check_images_names_unreadable_files(tmp_path):
    root = _two_classes(tmp_path / "pets")
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    big.save(root / "dogs" / "truncated.jpg")
    data = (root / "dogs" / "truncated.jpg").read_bytes()
    (root / "dogs" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "cats" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    expected = {root / "cats" / "garbage.jpg", root / "dogs" / "truncated.jpg"}

    bad = ds.check_images(root)
    assert {p for p, _ in bad} == expected
    assert all(reason for _, reason in bad)
    assert {p for p, _ in ds.check_images(ds.image_folder(root))} == expected


# ----------------------------------------------------------------------------- bundled


def test_digits():
    X, y = ds.digits()
    assert X.shape == (1797, 8, 8) and X.dtype == np.float32
    assert X.min() == 0.0 and X.max() == 1.0
    assert y.shape == (1797,) and y.dtype == np.int64 and set(np.unique(y)) == set(range(10))


def test_lfw_subset():
    X, y = ds.lfw_subset()
    assert X.shape == (200, 25, 25) and X.dtype == np.float32 and 0 <= X.min() <= X.max() <= 1
    assert y.dtype == np.int64 and y.sum() == 100 and y[:100].all()


def test_photos_load_offline_as_rgb():
    pics = ds.photos()
    assert set(pics) == set(ds.COLOUR_PHOTOS) and {"chelsea", "coffee"} <= set(pics)
    assert all(im.mode == "RGB" for im in pics.values())
    assert pics["chelsea"].size == (451, 300)
    assert ds.photos(["camera"])["camera"].mode == "RGB"
    with pytest.raises(ValueError, match="eagle"):
        ds.photos(["eagle"])  # in skimage.data, but only through a download


# ----------------------------------------------------------------------------- torchvision


def _usps_file(path: Path, n: int, label: int = 3):
    """n rows in USPS's libsvm format: label, then 256 index:value pairs in [-1, 1]."""
    row = f"{label} " + " ".join(f"{i + 1}:{(i % 3) - 1}" for i in range(256)) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with bz2.open(path, "wt") as f:
        f.write(row * n)


def test_torchvision_dataset_from_disk_and_its_states(data):
    assert ds.verify("usps").state == "missing"
    with pytest.raises(ds.DatasetUnavailable, match="downloading was not allowed"):
        ds.torchvision_dataset("usps", "train", download=False)

    _usps_file(data / "usps" / "usps.bz2", 3)
    _usps_file(data / "usps" / "usps.t.bz2", 2)
    train = ds.torchvision_dataset("usps", "train", download=True)  # present: no download
    test = ds.torchvision_dataset("usps", "test", transform=np.asarray, download=False)
    assert (len(train), len(test)) == (3, 2)
    x, y = test[0]
    assert x.shape == (16, 16) and y == 2
    assert ds.verify("usps").state == "ok"

    (data / "usps" / "usps.t.bz2").write_bytes(b"damaged")
    st = ds.verify("usps")
    assert st.state == "corrupt" and "'test'" in st.message
    with pytest.raises(ValueError, match="splits train, test"):
        ds.torchvision_dataset("usps", "val")

