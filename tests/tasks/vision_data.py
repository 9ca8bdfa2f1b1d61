"""Image datasets written to disk in the real datasets' layouts, read back with the users' load_dataset call.

    python -m tests.tasks.vision_data digits <dir>      # sklearn's 1,797 real digits as an imagefolder

    write_digits_imagefolder(dir)       <dir>/{train,validation,test}/<digit>/<n>.png       load_dataset(dir)
    write_beans(dir)                    README configs + data/<split>-00000-of-00001.parquet  (image_file_path, image, labels)
    write_cifar10(dir)                  README configs + plain_text/<split>-*.parquet        (img, label)
    write_scene_parse(dir)              README configs + scene_parsing/<split>-*.parquet     (image, annotation, scene_category)

Generated images are easy on purpose: a class is a colour (classification) or a coloured rectangle
(segmentation), so a tiny model learns them in a few steps.
"""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import numpy as np

BEANS = ["angular_leaf_spot", "bean_rust", "healthy"]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30), (220, 30, 220), (30, 220, 220),
           (255, 140, 0), (120, 60, 20), (255, 255, 255), (0, 0, 0)]
"""Colour of class k (classification: the image's tint; segmentation: class k+1's rectangles)."""
SPLITS = ("train", "validation", "test")


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def tinted(rng: np.random.Generator, label: int, size: int = 16):
    """An RGB image of class `label`'s colour plus noise."""
    from PIL import Image

    pixels = np.array(COLOURS[label % len(COLOURS)], dtype=np.float64) + rng.normal(0, 25, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def scene(rng: random.Random, num_classes: int, height: int = 32, width: int = 32):
    """(RGB image, label map L) of a grey background (id 0, "other") with rectangles of ids 1..num_classes,
    each drawn in its colour."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (128, 128, 128))
    labels = Image.new("L", (width, height), 0)
    draw_image, draw_labels = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    for _ in range(rng.randint(1, 3)):
        cls = rng.randint(1, num_classes)
        x0, y0 = rng.randint(0, width - 8), rng.randint(0, height - 8)
        box = (x0, y0, min(width - 1, x0 + rng.randint(6, 16)), min(height - 1, y0 + rng.randint(6, 16)))
        draw_image.rectangle(box, fill=COLOURS[(cls - 1) % len(COLOURS)])
        draw_labels.rectangle(box, fill=cls)
    return image, labels


def write_readme(root: Path, config: str, splits: tuple[str, ...], title: str) -> None:
    files = "".join(f"  - split: {s}\n    path: {config}/{s}-*\n" for s in splits)
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}---\n# {title}\n")


def write_parquet(rows: dict, features, path: Path) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))


def write_digits_imagefolder(root: Path, limit: int | None = None) -> Path:
    """sklearn's digits (real 8x8 images, 0..16 scaled to 0..255) as an imagefolder; rows n % 10 == 8 go to
    validation, == 9 to test, the rest to train."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    count = len(digits.target) if limit is None else min(limit, len(digits.target))
    for n in range(count):
        split = "validation" if n % 10 == 8 else "test" if n % 10 == 9 else "train"
        folder = root / split / str(int(digits.target[n]))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(digits.images[n] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{n:04d}.png")
    return root


def write_beans(root: Path, rows_per_split: int = 24, seed: int = 0) -> Path:
    """A folder laid out like AI-Lab-Makerere/beans (config default, data/<split>-*.parquet)."""
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features({"image_file_path": datasets.Value("string"), "image": datasets.Image(),
                                  "labels": datasets.ClassLabel(names=BEANS)})
    for split in SPLITS:
        labels = [i % len(BEANS) for i in range(rows_per_split)]
        rows = {"image_file_path": [f"/{split}/{BEANS[y]}/{i}.jpg" for i, y in enumerate(labels)],
                "image": [{"bytes": png(tinted(rng, y)), "path": None} for y in labels], "labels": labels}
        write_parquet(rows, features, root / "data" / f"{split}-00000-of-00001.parquet")
    write_readme(root, "default", SPLITS, "beans (generated for tests)")
    readme = (root / "README.md").read_text().replace("path: default/", "path: data/")
    (root / "README.md").write_text(readme)
    return root


def write_cifar10(root: Path, rows_per_split: int = 40, seed: int = 0) -> Path:
    """A folder laid out like uoft-cs/cifar10 (config plain_text: train and test only)."""
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10)})
    for split in ("train", "test"):
        labels = [i % 10 for i in range(rows_per_split)]
        rows = {"img": [{"bytes": png(tinted(rng, y, 32)), "path": None} for y in labels], "label": labels}
        write_parquet(rows, features, root / "plain_text" / f"{split}-00000-of-00001.parquet")
    write_readme(root, "plain_text", ("train", "test"), "cifar10 (generated for tests)")
    return root


def write_scene_parse(root: Path, rows_per_split: int = 16, num_classes: int = 3, seed: int = 0,
                      sizes: tuple[tuple[int, int], ...] = ((32, 32), (24, 32))) -> Path:
    """A folder laid out like zhoubolei/scene_parse_150 (config scene_parsing; image, annotation,
    scene_category), label ids 0 ("other") and 1..num_classes; images of the given (height, width) sizes."""
    import datasets

    rng = random.Random(seed)
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image(),
                                  "scene_category": datasets.ClassLabel(names=["outdoor", "indoor"])})
    for split in SPLITS:
        rows: dict[str, list] = {"image": [], "annotation": [], "scene_category": []}
        for i in range(rows_per_split):
            image, labels = scene(rng, num_classes, *sizes[i % len(sizes)])
            rows["image"].append({"bytes": png(image), "path": None})
            rows["annotation"].append({"bytes": png(labels), "path": None})
            rows["scene_category"].append(i % 2)
        write_parquet(rows, features, root / "scene_parsing" / f"{split}-00000-of-00001.parquet")
    write_readme(root, "scene_parsing", SPLITS, "scene_parse_150 (generated for tests)")
    return root


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "digits":
        sys.exit("usage: python -m tests.tasks.vision_data digits <dir>")
    print(write_digits_imagefolder(Path(sys.argv[2])))
