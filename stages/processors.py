"""Image processors for the prepare_data stage: the pretrained one of the weights, or one built from model.config.

    processor = build_processor(model_config, family)
    processor.save_pretrained(<dataset ref>/tokenizer)      # where a text model keeps its tokenizer

model.tokenizer picks: `pretrained` (AutoImageProcessor from the weights' folder) or `image_processor` (random-init
models: a processor sized to model.config.image_size, mean/std 0.5, the family's label handling).
"""

from __future__ import annotations

from typing import Any

from stages.common import resolve_model_path
from stages.schema import ModelConfig

# the processor class of each random-init model type (the one its Hub checkpoints ship)
_PROCESSORS = {
    "vit": "ViTImageProcessor",
    "deit": "DeiTImageProcessor",
    "beit": "BeitImageProcessor",
    "convnext": "ConvNextImageProcessor",
    "segformer": "SegformerImageProcessor",
}
DEFAULT_IMAGE_SIZE = 32
"""Square input side when model.config has no image_size (SegFormer configs don't)."""


def image_processor_from_config(config: dict[str, Any], family: Any = None) -> Any:
    """A processor for a random-init model: resize to the config's image_size, rescale to [0, 1], normalise
    with mean = std = 0.5 (what ViT checkpoints use). Segmentation: do_reduce_labels as task.options says
    (recorded for users of the saved processor; the family reduces labels itself)."""
    import transformers

    model_type = config.get("model_type")
    if model_type not in _PROCESSORS:
        raise ValueError(
            f"model.config.model_type={model_type!r}: no image processor known for it; use one of "
            f"{', '.join(sorted(_PROCESSORS))}, or pretrained weights with model.tokenizer=pretrained."
        )
    side = int(config.get("image_size", DEFAULT_IMAGE_SIZE))
    kwargs: dict[str, Any] = {
        "size": {"height": side, "width": side}, "do_resize": True, "do_rescale": True, "do_normalize": True,
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
    }
    if model_type == "convnext":
        kwargs["size"], kwargs["crop_pct"] = {"shortest_edge": side}, 1.0
    if model_type in ("segformer", "beit"):
        options = getattr(family, "options", None)
        kwargs["do_reduce_labels"] = bool(getattr(options, "reduce_labels", False))
    return getattr(transformers, _PROCESSORS[model_type])(**kwargs)


def build_processor(model: ModelConfig, family: Any = None) -> Any:
    """The image processor of `model`: from its weights (tokenizer=pretrained) or from model.config."""
    path = resolve_model_path(model)
    if model.tokenizer == "pretrained" and path is not None:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(path, revision=model.revision,
                                                  trust_remote_code=model.trust_remote_code)
    return image_processor_from_config(dict(model.config), family)
