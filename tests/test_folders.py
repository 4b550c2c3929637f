"""Bring-your-own-images: folders of class subfolders, and the probe command on them."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from tlcourse import folders
from tlcourse.datasets import ImageFolderError


def make_folder(root, classes=("red", "blue"), n=6, size=48):
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            shade = 120 + 20 * i
            colour = {"red": (shade, 20, 20), "blue": (20, 20, shade), "green": (20, shade, 20)}[cls]
            Image.new("RGB", (size, size), colour).save(root / cls / f"{i}.jpg")
    return root


def test_val_split_is_stratified(tmp_path):
    data = folders.load_train_val(make_folder(tmp_path / "all", n=10), val_split=0.3)
    assert data.classes == ["blue", "red"]
    assert data.counts("val") == {"blue": 3, "red": 3} and data.counts("train") == {"blue": 7, "red": 7}


def test_val_folder_must_have_the_same_classes(tmp_path):
    make_folder(tmp_path / "train")
    make_folder(tmp_path / "val", classes=("red", "green"))
    with pytest.raises(ImageFolderError, match="class folders differ"):
        folders.load_train_val(tmp_path / "train", tmp_path / "val")


def test_unreadable_images_are_left_out_with_a_warning(tmp_path):
    root = make_folder(tmp_path / "train")
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    make_folder(tmp_path / "val")
    with pytest.warns(UserWarning, match="broken.jpg"):
        data = folders.load_train_val(root, tmp_path / "val")
    assert data.counts("train") == {"blue": 6, "red": 6}
    assert [p.name for p, _ in data.skipped] == ["broken.jpg"]


def test_missing_validation_is_explained(tmp_path):
    with pytest.raises(ValueError, match="--val-split 0.2"):
        folders.load_train_val(make_folder(tmp_path / "train"))
    with pytest.raises(ValueError, match="between 0 and 1"):
        folders.load_train_val(tmp_path / "train", val_split=1.5)


def test_a_split_that_cannot_be_made_says_why(tmp_path):
    root = make_folder(tmp_path / "train", n=3)
    for extra in (root / "blue").iterdir():
        if extra.name != "0.jpg":
            extra.unlink()                                   # blue keeps one image
    with pytest.raises(ImageFolderError, match="'blue' have fewer than 2 images.*a validation folder"):
        folders.load_train_val(root, val_split=0.3)


def test_per_class_accuracy():
    acc = folders.per_class_accuracy([0, 0, 1, 1], [0, 1, 1, 1], ["a", "b"])
    assert acc == {"a": 1.0, "b": pytest.approx(2 / 3)}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tlcourse.cli", *args], capture_output=True, text=True, timeout=300)


def test_probe_command_end_to_end(tmp_path):
    make_folder(tmp_path / "train", n=8)
    make_folder(tmp_path / "val", n=4)
    model = tmp_path / "colours.pt"
    out = _cli("probe", str(tmp_path / "train"), str(tmp_path / "val"), "--image-size", "64", "--json", "--out", str(model))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["accuracy"] == 1.0 and set(summary["per_class_accuracy"]) == {"red", "blue"}
    assert summary["train_images"] == 16 and summary["val_images"] == 8 and summary["images_per_second"] > 0
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "new_red.png")
    out = _cli("predict", "--model", str(model), str(tmp_path / "new_red.png"), "--top", "1", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[str(tmp_path / "new_red.png")][0]["class"] == "red"


@pytest.mark.parametrize("layout, message", [
    ("one_class", "only one class folder"),
    ("empty_class", "contain no images"),
    ("loose", "lie directly in"),
])
def test_probe_command_rejects_bad_folders(call, tmp_path, layout, message):
    root = tmp_path / "train"
    if layout == "one_class":
        make_folder(root, classes=("red",))
    elif layout == "empty_class":
        make_folder(root)
        (root / "green").mkdir()
    else:
        make_folder(root)
        Image.new("RGB", (8, 8)).save(root / "stray.jpg")
    out = call("probe", str(root), "--val-split", "0.3")
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_finetune_command_end_to_end(call, tmp_path):
    make_folder(tmp_path / "train", n=8)
    model = tmp_path / "ft.pt"
    out = _cli("finetune", str(tmp_path / "train"), "--val-split", "0.25", "--image-size", "64", "--epochs", "2",
               "--blocks", "1", "--json", "--out", str(model))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["val_images"] == 4 and summary["train_images"] == 12 and len(summary["val_accuracy_per_epoch"]) == 2
    assert 0 < summary["trainable_parameters"] < 4_000_000  # only the last group and the head train
    assert model.exists()
    out = call("finetune", str(tmp_path / "train"), "--val-split", "0.25", "--epochs", "0")
    assert out.returncode == 2 and "at least 1" in out.stderr


def test_finetune_methods_save_what_they_trained_and_predict_loads_it(call, tmp_path):
    """--method lora/bitfit save only what they trained (the rest is rebuilt from the pretrained
    weights); every saved model loads in `predict --model` and gives the trained model's answers."""
    import torch

    from tlcourse import models

    make_folder(tmp_path / "train", n=8)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "new_red.png")
    sizes = {}
    for method, extra in (("full", []), ("lora", ["--rank", "2"]), ("bitfit", []), ("lp-ft", [])):
        path = tmp_path / f"{method}.pt"
        out = call("finetune", str(tmp_path / "train"), "--val-split", "0.25", "--image-size", "64", "--epochs", "1",
                   "--batch-size", "6", "--method", method, *extra, "--json", "--out", str(path))
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["saved_bytes"] == path.stat().st_size
        sizes[method] = (summary["saved_bytes"], summary["trainable_parameters"])
        model, classes, transform = models.load_classifier(path)
        assert type(model).__name__ == "EfficientNet" and classes == ["blue", "red"]  # LoRA comes back merged
        assert not any("lora" in n for n, _ in model.named_parameters())
        out = call("predict", "--model", str(path), str(tmp_path / "new_red.png"), "--top", "2", "--json")
        assert out.returncode == 0, out.stderr
        with torch.no_grad():
            p = model(transform(Image.open(tmp_path / "new_red.png").convert("RGB"))[None]).softmax(1)[0]
        answer = json.loads(out.stdout)[str(tmp_path / "new_red.png")][0]
        assert answer["class"] == classes[int(p.argmax())]
    full_bytes, full_trained = sizes["full"]
    assert sizes["lp-ft"][1] == full_trained
    assert sizes["lora"][1] < 0.02 * full_trained and sizes["lora"][0] * 20 < full_bytes
    assert sizes["bitfit"][1] < 0.02 * full_trained and sizes["bitfit"][0] * 20 < full_bytes


def test_finetune_method_and_blocks_must_agree(call, tmp_path):
    make_folder(tmp_path / "train", n=4)
    out = call("finetune", str(tmp_path / "train"), "--val-split", "0.25", "--method", "last-k")
    assert out.returncode == 2 and "--blocks K" in out.stderr
    out = call("finetune", str(tmp_path / "train"), "--val-split", "0.25", "--method", "full", "--blocks", "2")
    assert out.returncode == 2 and "--method last-k" in out.stderr


def test_finetune_on_two_processes_takes_the_steps_of_one(call, tmp_path):
    """`--nproc 2` (DDP, launched by torch.distributed.run) with the same effective batch saves the
    weights `--nproc 1` saves, up to rounding, and reports the split of the batch and its speed."""
    import torch

    make_folder(tmp_path / "train", n=8)
    runs = {}
    for n in (1, 2):
        path = tmp_path / f"ft{n}.pt"
        out = _cli("finetune", str(tmp_path / "train"), "--val-split", "0.25", "--image-size", "64", "--epochs", "2",
                   "--blocks", "1", "--batch-size", "4", "--nproc", str(n), "--json", "--out", str(path))
        assert out.returncode == 0, out.stderr
        runs[n] = json.loads(out.stdout), torch.load(path, weights_only=False)["state_dict"]
        assert runs[n][0]["processes"] == n and runs[n][0]["per_process_batch"] == 4 // n
        assert runs[n][0]["steps"] == 2 * (12 // 4) and runs[n][0]["images_per_second"] > 0
    (one, w1), (two, w2) = runs[1], runs[2]
    assert w1.keys() == w2.keys() and len(w1) > 2
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-4)
    assert two["accuracy"] == one["accuracy"]
    out = call("finetune", str(tmp_path / "train"), "--val-split", "0.25", "--nproc", "2", "--batch-size", "5")
    assert out.returncode == 2 and "multiple of 2" in out.stderr
