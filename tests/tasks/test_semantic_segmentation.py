"""semantic_segmentation: label maps stay at full resolution (padded with 255), the loss and the masks follow
each image's own size, bad maps are refused by row, and serving gives a PNG mask with class areas."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from tests.tasks.cases.semantic_segmentation import CASE, TINY_SEGFORMER, processor
from tests.tasks.vision_data import png
from trainer_core.tasks import get_task

Family = get_task("semantic_segmentation")


def family(**options):
    return Family(dataclasses.replace(CASE.spec, options={"reduce_labels": True, **options}))


def image(height, width, value=128):
    return Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8))


def label_map(array):
    return Image.fromarray(np.asarray(array, dtype=np.uint8))


def test_a_map_of_the_wrong_size_names_the_row_the_column_and_both_sizes():
    rows = {"image": [image(4, 6), image(4, 6)], "annotation": [label_map(np.zeros((4, 6))), label_map(np.zeros((5, 6)))]}
    (error,) = family().check_raw(datasets.DatasetDict(train=datasets.Dataset.from_dict(rows)), ("train",))
    assert error.startswith("task.label_column='annotation': row 1 of the train split has a 6x5")
    assert "for a 6x4 image" in error


def test_class_ids_beyond_num_labels_and_undecodable_images_are_refused():
    maps = [label_map([[0, 3]]), label_map([[4, 255]])]  # reduce_labels: 0..3 are valid (3 classes + other)
    rows = {"image": [image(1, 2), image(1, 2)], "annotation": maps}
    (error,) = family().check_raw(datasets.DatasetDict(train=datasets.Dataset.from_dict(rows)), ("train",))
    assert "row 1 of the train split has class ids [4]" in error
    broken = {"image": [png(image(1, 2)), b"\x89PNG broken"], "annotation": [png(m) for m in maps]}
    (error,) = family().check_raw(datasets.DatasetDict(train=datasets.Dataset.from_dict(broken)), ("train",))
    assert error.startswith("task.columns.image='image': row 1 of the train split cannot be decoded")


def test_collator_keeps_full_resolution_labels_reduced_flattened_and_padded():
    fam = family()
    collate = fam.collator(processor(fam, None))
    rows = [{"image_bytes": png(image(2, 3)), "labels": png(label_map([[0, 1, 2], [3, 3, 0]]))},
            {"image_bytes": png(image(1, 2)), "labels": png(label_map([[2, 255]]))}]
    batch = collate(rows)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)  # the processor's size
    assert batch["image_sizes"].tolist() == [[2, 3], [1, 2]]
    # reduce_labels: 0 -> 255, k -> k - 1; row-major; the shorter map padded with 255
    assert batch["labels"].tolist() == [[255, 0, 1, 2, 2, 255], [1, 255, 255, 255, 255, 255]]
    assert fam.count_items({"labels": batch["labels"]}).tolist() == [4, 1]


def test_loss_is_summed_over_labelled_pixels_at_each_maps_size():
    fam = family()
    labels = torch.tensor([[255, 0, 1, 2, 2, 255], [1, 255, 255, 255, 255, 255]], dtype=torch.int16)
    sizes = torch.tensor([[2, 3], [1, 2]])
    logits = torch.zeros(2, 3, 8, 8)  # uniform: every labelled pixel costs log(3)
    loss = fam.loss(SimpleNamespace(logits=logits), {"labels": labels, "image_sizes": sizes})
    torch.testing.assert_close(loss, torch.tensor([4 * math.log(3), math.log(3)]))
    logits[1, 1] = 20.0  # the second image predicts class 1 with certainty: its one labelled pixel is 1
    loss = fam.loss(SimpleNamespace(logits=logits), {"labels": labels, "image_sizes": sizes})
    assert loss[1] < 1e-6 and loss[0] == pytest.approx(4 * math.log(3), rel=1e-5)


def test_eval_masks_follow_each_images_size_and_pad_with_255():
    fam = family()
    logits = torch.zeros(2, 3, 8, 8)
    logits[0, 2], logits[1, 0] = 1.0, 1.0
    model = lambda pixel_values: SimpleNamespace(logits=logits)  # noqa: E731
    sizes = torch.tensor([[2, 3], [1, 2]])
    step = fam.eval_step(model, {"pixel_values": torch.zeros(2, 3, 32, 32)}, {"image_sizes": sizes})
    assert step.loss is None  # an unlabelled split: masks only
    assert step.outputs["masks"].dtype == torch.int16
    assert step.outputs["masks"].tolist() == [[2] * 6, [0, 0, 255, 255, 255, 255]]
    records = fam.postprocess({k: v.numpy() for k, v in step.outputs.items()})
    assert records["mask"][1].tolist() == [[0, 0]]
    assert records["class_areas"][0] == {"blue": 6} and records["class_areas"][1] == {"red": 2}


def test_metrics_per_class_iou_only_for_classes_that_occur():
    fam = family()
    # trainer-gathered: -100 pads across batches, 255 inside a batch
    masks = np.array([[0, 0, 1, -100], [1, 1, 255, 255]])
    labels = np.array([[0, 255, 1, -100], [1, 0, 255, 255]])
    metrics = fam.compute_metrics({"masks": masks}, {"labels": labels})
    # counted (label, pred): (0,0) (1,1) (1,1) (0,1): class 0 1/2, class 1 2/3, class 2 absent
    assert metrics == pytest.approx({"mean_iou": (1 / 2 + 2 / 3) / 2, "pixel_accuracy": 3 / 4,
                                     "iou_red": 1 / 2, "iou_green": 2 / 3})
    assert fam.metric_names() == ["mean_iou", "pixel_accuracy"]


def test_serving_gives_a_png_mask_of_the_image_size_and_class_areas(tmp_path):
    fam = family()
    torch.manual_seed(0)
    fam.build_model(dataclasses.replace(CASE.model, config=dict(TINY_SEGFORMER))).save_pretrained(tmp_path)
    processor(fam, None).save_pretrained(tmp_path)
    model, proc = fam.load_for_serving(str(tmp_path))
    import pandas as pd

    path = tmp_path / "scene.png"
    image(20, 30, 60).save(path)
    out = fam.serve(model, proc, pd.DataFrame({"image": [str(path), base64.b64encode(path.read_bytes()).decode()]}))
    assert list(out.columns) == ["mask", "class_areas"] and len(out) == 2
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["mask"][0]))))
    assert mask.shape == (20, 30) and set(np.unique(mask)) <= {0, 1, 2}
    areas = json.loads(out["class_areas"][0])
    assert sum(areas.values()) == 20 * 30 and set(areas) <= {"red", "green", "blue"}
    assert out["mask"][0] == out["mask"][1]


def test_scene_parse_150_yaml_reads_a_folder_in_the_hub_layout(tmp_path):
    from flows.config import compose
    from stages.sources import load_raw
    from tests.tasks.vision_data import write_scene_parse

    folder = write_scene_parse(tmp_path / "scene_parse_150", rows_per_split=4, num_classes=3)
    cfg = compose(["task=scene_parse_150", f"task.dataset_path={folder}", "task.num_labels=3",
                   "task.label_names=[red,green,blue]", "model=tiny_segformer", f"paths.root={tmp_path / 'state'}"])
    raw = load_raw(cfg.task, cfg.paths.root)
    assert raw["validation"].column_names == ["image", "annotation", "scene_category"]
    # write_scene_parse alternates (32, 32) and (24, 32) images; a map has the size of its image
    first, second = raw["train"][0], raw["train"][1]
    assert first["image"].size == first["annotation"].size == (32, 32)
    assert second["image"].size == second["annotation"].size == (32, 24)
    assert set(np.unique(np.asarray(second["annotation"]))) <= {0, 1, 2, 3}
