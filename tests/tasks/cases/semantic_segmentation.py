"""semantic_segmentation on scene_parse_150's schema: image, annotation (label map, 0 = other), scene_category;
reduce_labels on, images of two sizes (labels padded inside the batch); a tiny SegFormer."""

import random

from tests.tasks.factories import FamilyCase
from tests.tasks.vision_data import scene
from trainer_core.spec import ModelSpec, TaskSpec

TINY_SEGFORMER = {"model_type": "segformer", "image_size": 32, "num_channels": 3, "num_encoder_blocks": 2,
                  "depths": [1, 1], "sr_ratios": [2, 1], "hidden_sizes": [16, 32], "patch_sizes": [7, 3],
                  "strides": [4, 2], "num_attention_heads": [1, 2], "mlp_ratios": [2, 2], "decoder_hidden_size": 32}


def processor(family, raw):
    from stages.processors import image_processor_from_config

    return image_processor_from_config(TINY_SEGFORMER, family)


_rng = random.Random(0)
_scenes = [scene(_rng, 3, 32, 32), scene(_rng, 3, 24, 32), scene(_rng, 3, 32, 32)]
CASE = FamilyCase(
    spec=TaskSpec(family="semantic_segmentation", columns={"image": "image", "label": "annotation"}, num_labels=3,
                  label_names=["red", "green", "blue"], metrics=["mean_iou", "pixel_accuracy", "per_class_iou"],
                  options={"reduce_labels": True}),
    raw={"image": [image for image, _ in _scenes], "annotation": [labels for _, labels in _scenes],
         "scene_category": [0, 1, 0]},
    model=ModelSpec(config=dict(TINY_SEGFORMER), dropout=0.0),
    processor=processor,
)
