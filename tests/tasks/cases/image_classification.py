"""image_classification on cifar10's schema: img (Image), label (ClassLabel ids of 10 classes); a tiny ViT."""

import numpy as np

from tests.tasks.factories import FamilyCase
from tests.tasks.vision_data import CIFAR10, tinted
from trainer_core.spec import ModelSpec, TaskSpec

TINY_VIT = {"model_type": "vit", "image_size": 32, "patch_size": 4, "num_channels": 3, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def processor(family, raw):
    from stages.processors import image_processor_from_config

    return image_processor_from_config(TINY_VIT, family)


_rng = np.random.default_rng(0)
CASE = FamilyCase(
    spec=TaskSpec(family="image_classification", columns={"image": "img", "label": "label"}, num_labels=10,
                  label_names=list(CIFAR10), metrics=["accuracy", "top5_accuracy"]),
    raw={"img": [tinted(_rng, y, 32) for y in (3, 8, 0)], "label": [3, 8, 0]},
    model=ModelSpec(config=dict(TINY_VIT), dropout=0.0),
    processor=processor,
)
