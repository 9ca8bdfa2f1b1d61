"""image_classification: refused rows are named, the collator augments only while training, serving decodes
bytes, base64 and files alike."""

from __future__ import annotations

import base64
import dataclasses
import math

import datasets
import numpy as np
import pytest
import torch

from tests.tasks.cases.image_classification import CASE, TINY_VIT, processor
from tests.tasks.vision_data import png, tinted
from trainer_core.tasks import get_task

Family = get_task("image_classification")


def family(**changes):
    return Family(dataclasses.replace(CASE.spec, **changes))


def raw_dict(**splits):
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(rows) for name, rows in splits.items()})


def test_an_image_that_cannot_be_decoded_is_named_by_row_and_column():
    good = png(tinted(np.random.default_rng(0), 1))
    rows = {"img": [good, b"definitely not a png", good], "label": [1, 2, 3]}
    errors = family().check_raw(raw_dict(train=rows, validation=rows), ("train", "validation"))
    assert len(errors) == 2
    assert errors[0].startswith("task.columns.image='img': row 1 of the train split cannot be decoded")
    assert "row 1 of the validation split" in errors[1]


def test_a_label_name_not_in_the_label_list_is_named():
    image = png(tinted(np.random.default_rng(0), 1))
    fam = family(num_labels=2, label_names=["cat", "dog"], metrics=["accuracy"])
    errors = fam.check_raw(raw_dict(train={"img": [image] * 3, "label": ["dog", "cat", "horse"]}), ("train",))
    assert len(errors) == 1 and "row 2 of the train split has label 'horse'" in errors[0]
    assert errors[0].startswith("task.label_column='label'") and "cat, dog" in errors[0]
    out = fam.preprocess(None)({"img": [image, image], "label": ["dog", "cat"]}, [0, 1])
    assert out["labels"] == [1, 0]  # names map to their position in task.label_names


def test_class_label_names_must_agree_with_task_label_names():
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["dog", "cat"])})
    image = tinted(np.random.default_rng(0), 1)
    split = datasets.Dataset.from_dict({"img": [image], "label": [0]}, features=features)
    fam = family(num_labels=2, label_names=["cat", "dog"], metrics=["accuracy"])
    (error,) = fam.check_raw(datasets.DatasetDict(train=split), ("train",))
    assert error.startswith("task.label_names:") and "['dog', 'cat']" in error


def test_top5_needs_more_than_five_classes():
    spec = dataclasses.replace(CASE.spec, num_labels=3, label_names=[])
    assert any("top5_accuracy needs more than 5 classes" in e for e in Family.config_errors(spec))
    assert Family.config_errors(dataclasses.replace(spec, metrics=["accuracy"])) == []


def _asymmetric():
    from PIL import Image

    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, :16] = 255  # left half white: a flip makes the left half black
    return png(Image.fromarray(pixels))


def test_the_collator_flips_only_while_training():
    fam = family(options={"random_flip": True})
    collate = fam.collator(processor(fam, None))
    rows = [{"image_bytes": _asymmetric(), "labels": 1}] * 8
    with torch.no_grad():
        for _ in range(3):
            left = collate(rows)["pixel_values"][:, :, :, :16]
            assert torch.all(left == 1.0)  # white after rescale and (x - 0.5) / 0.5
    torch.manual_seed(0)
    flipped = (collate(rows)["pixel_values"][:, 0, 0, 0] == -1.0).tolist()
    assert any(flipped) and not all(flipped)  # p = 0.5 per image: 8 equal outcomes would be 1 in 128


def test_metrics_from_logits_hand_computed():
    fam = family()
    logits = np.zeros((4, 10))
    logits[np.arange(4), [3, 8, 1, 1]] = 5.0      # predicted 3, 8, 1, 1
    logits[2, 0] = 4.0                           # row 2's label 0 is second best
    metrics = fam.compute_metrics({"logits": logits}, {"labels": np.array([3, 8, 0, 7])})
    assert metrics["accuracy"] == pytest.approx(2 / 4)
    assert metrics["top5_accuracy"] == pytest.approx(3 / 4)  # row 3's label 7 ties with 8 others at 0: not top-5


def test_prediction_rows_name_the_class_and_its_softmax_score():
    fam = family()
    logits = np.zeros((1, 10))
    logits[0, 8] = math.log(9 * 3)  # softmax(ship) = 27 / (27 + 9) = 0.75
    dataset = datasets.Dataset.from_dict({"example_id": [5], "labels": [8]})
    (row,) = fam.prediction_rows({"logits": logits}, dataset, scored=True)
    assert row == {"row_id": 5, "label": "ship", "label_id": 8, "score": 0.75, "true_label": 8}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny ViT saved and reloaded as the registered model folder would hold it."""
    folder = tmp_path_factory.mktemp("vit")
    fam = family()
    torch.manual_seed(0)
    fam.build_model(dataclasses.replace(CASE.model, config=dict(TINY_VIT))).save_pretrained(folder)
    processor(fam, None).save_pretrained(folder)
    return fam, *fam.load_for_serving(str(folder))


def test_serving_reads_bytes_base64_and_files_alike(served, tmp_path):
    import pandas as pd

    fam, model, proc = served
    data = png(tinted(np.random.default_rng(1), 4, 20))
    path = tmp_path / "x.png"
    path.write_bytes(data)
    frame = pd.DataFrame({"img": [data, base64.b64encode(data).decode(), str(path)]})
    out = fam.serve(model, proc, frame)
    assert list(out.columns) == ["label", "score"] and len(out) == 3
    assert out["label"].nunique() == 1 and out["score"].nunique() == 1
    assert out["label"][0] in CASE.spec.label_names and 0.0 < out["score"][0] <= 1.0
    with pytest.raises(ValueError, match="input row 1: not an image"):
        fam.serve(model, proc, pd.DataFrame({"img": [data, "no-such-file.png"]}))


# --- the task YAMLs read their data the way users' runs do (stages.sources.load_raw: the preflight's call) ---


def load_task(tmp_path, *overrides):
    from flows.config import compose
    from stages.sources import load_raw

    cfg = compose([*overrides, "model=tiny_vit", f"paths.root={tmp_path / 'state'}"])
    return cfg.task, load_raw(cfg.task, cfg.paths.root)


def pixels(value) -> np.ndarray:
    from trainer_core.tasks import _images

    return np.asarray(_images.to_pil(value))


def test_digits_loader_reads_sklearn_directly_with_the_n_mod_10_split(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    task, raw = load_task(tmp_path, "task=digits")
    assert task.loader == "digits" and not any((tmp_path / "state").glob("**/*.png"))  # nothing written
    # 1,797 rows: n % 10 == 8 (n = 8, 18, ..., 1788) -> 179 validation, == 9 -> 179 test, the rest 1,439 train
    assert {name: len(split) for name, split in raw.items()} == {"train": 1439, "validation": 179, "test": 179}
    assert raw["train"].features["label"].names == [str(d) for d in range(10)]
    # train row 10 is sklearn row 12 (rows 8 and 9 went to validation / test); validation row 1 is row 18
    for split, row, n in (("train", 0, 0), ("train", 10, 12), ("validation", 1, 18), ("test", 0, 9)):
        assert raw[split][row]["label"] == digits.target[n]
        np.testing.assert_array_equal(pixels(raw[split][row]["image"]), np.round(digits.images[n] * 255 / 16))


def test_digits_with_dataset_path_reads_the_imagefolder(tmp_path):
    from sklearn.datasets import load_digits

    from tests.tasks.vision_data import write_digits_imagefolder

    folder = write_digits_imagefolder(tmp_path / "digits", limit=60)
    _, raw = load_task(tmp_path, "task=digits", f"task.dataset_path={folder}")
    assert {name: len(split) for name, split in raw.items()} == {"train": 48, "validation": 6, "test": 6}
    target = load_digits().target
    # class = folder name; the imagefolder builder lists labels sorted, so the id of folder "d" is d
    assert sorted(raw["validation"]["label"]) == sorted(int(target[n]) for n in range(8, 60, 10))


def test_beans_yaml_reads_a_folder_in_the_hub_layout(tmp_path):
    from tests.tasks.vision_data import BEANS, write_beans

    task, raw = load_task(tmp_path, "task=beans", f"task.dataset_path={write_beans(tmp_path / 'beans', 6)}")
    assert task.spec().columns["image"] == "image" and task.label_column == "labels"
    assert raw["train"].features["labels"].names == BEANS
    assert raw["test"]["labels"] == [0, 1, 2, 0, 1, 2]  # write_beans: row i has class i % 3


def test_cifar10_yaml_scores_on_test_when_the_hub_repo_has_no_validation(tmp_path):
    from tests.tasks.vision_data import write_cifar10

    _, raw = load_task(tmp_path, "task=cifar10", f"task.dataset_path={write_cifar10(tmp_path / 'cifar10', 10)}")
    assert raw["train"].column_names == ["img", "label"]
    assert raw["validation"]["label"] == raw["test"]["label"] == list(range(10))
    assert pixels(raw["train"][0]["img"]).shape == (32, 32, 3)
