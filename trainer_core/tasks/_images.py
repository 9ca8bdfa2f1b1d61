"""Image values in every form the vision families meet them, decoded one way.

    from trainer_core.tasks import _images
    image = _images.to_pil(value)          # PIL image from bytes, base64, a path, {"bytes", "path"}, an array
    data = _images.to_png(value)           # lossless PNG bytes (what prepare_data stores)
    problem = _images.open_error(value)    # None, or why the value is not an image

Raw datasets hand over PIL images (datasets' Image feature, decoded), {"bytes": ..., "path": ...} dicts (the same
feature with decode=False), paths or bytes; a served model gets bytes, base64 strings or file paths.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image


def _raw_bytes(value: Any) -> bytes | None:
    """The encoded bytes behind a value, or None when it is already decoded (PIL, array)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return _raw_bytes(value["path"])
        raise ValueError("an image dict with neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        if os.path.isfile(value):
            with open(value, "rb") as handle:
                return handle.read()
        try:  # not a file: a base64 string (a data URL prefix is allowed)
            return base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value, validate=True)
        except (binascii.Error, ValueError):
            shown = value if len(value) < 80 else value[:77] + "..."
            raise ValueError(f"{shown!r} is neither an image file nor base64-encoded image bytes") from None
    return None


def to_pil(value: Any) -> Image.Image:
    """A decoded PIL image (pixels loaded) from any of the accepted forms."""
    import numpy as np
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    data = _raw_bytes(value)
    if data is None:
        raise ValueError(f"cannot read an image from a {type(value).__name__}")
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now: a truncated file fails here, not later in a collator
    return image


def to_rgb(value: Any) -> Image.Image:
    image = to_pil(value)
    return image if image.mode == "RGB" else image.convert("RGB")


def to_png(value: Any) -> bytes:
    """Lossless PNG bytes of an image or a label map (modes L, P, I;16 and RGB all survive)."""
    import numpy as np
    from PIL import Image

    image = to_pil(value)
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I"):
        image = image.convert("RGB")
    if image.mode == "I":  # 32-bit labels: PNG holds 16 bits, enough for any label set
        image = Image.fromarray(np.asarray(image).astype(np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def label_map(value: Any):
    """A label map as a 2-D integer array (palette images give their indices, not their colours)."""
    import numpy as np

    image = to_pil(value)
    array = np.asarray(image)
    if array.ndim == 3:  # an RGB(A) map of a single channel repeated: take the first channel
        array = array[..., 0]
    return array.astype(np.int64)


def open_error(value: Any) -> str | None:
    """Why `value` cannot be decoded as an image (None when it can)."""
    try:
        to_pil(value)
    except Exception as exc:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError)
        return f"{type(exc).__name__}: {exc}"
    return None


def size(value: Any) -> tuple[int, int]:
    """(width, height) of an image value."""
    return to_pil(value).size


def png_base64(array: Any) -> str:
    """A 2-D integer array as a base64 PNG (8-bit when it fits, 16-bit otherwise)."""
    import numpy as np
    from PIL import Image

    array = np.asarray(array)
    dtype = np.uint8 if array.size == 0 or array.max() < 256 else np.uint16
    buffer = io.BytesIO()
    Image.fromarray(array.astype(dtype)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def undecoded(dataset: Any, column: str) -> Any:
    """The column of a datasets.Dataset without decoding (Image feature with decode=False): checks open each
    value themselves and name the row that fails."""
    import datasets

    feature = dataset.features.get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(column, datasets.Image(decode=False))[column]
    return dataset[column]
