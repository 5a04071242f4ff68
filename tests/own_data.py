"""The kind of data users bring, made here: a folder of photos in every format and color
layout, with a corrupt file and a stray non-image; CSV tables from scikit-learn's
bundled ones, with string labels, an id column, a categorical column and a missing cell.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Digits 0, 1 and 7 of scikit-learn's set, under names: three classes a small model tells apart.
DIGIT_CLASSES = {"zero": 0, "one": 1, "seven": 7}
# (format, Pillow mode) cycled over the images: every decoder and colour layout the pipeline converts.
LAYOUTS = [("png", "RGB"), ("jpg", "RGB"), ("png", "L"), ("png", "RGBA"), ("png", "P"), ("jpeg", "L"),
           ("bmp", "RGB"), ("gif", "P"), ("PNG", "LA")]
# Odd sizes, all resized by the pipeline to dataset.image_size.
SIZES = [(16, 16), (20, 24), (17, 13), (32, 32), (12, 18)]


def digit_images(per_class: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """(class name, RGB uint8 image (8, 8, 3)) pairs: scikit-learn digits, each tinted."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    out = []
    for name, digit in DIGIT_CLASSES.items():
        chosen = np.flatnonzero(digits.target == digit)[:per_class]
        for index in chosen:
            gray = (digits.images[index] * 255.0 / 16.0).astype(np.float32)
            tint = rng.uniform(0.6, 1.0, size=3)
            out.append((name, np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)))
    return out


def save_image(rgb: np.ndarray, path: Path, mode: str, size: tuple[int, int]) -> None:
    """`rgb` (H, W, 3) uint8 saved at `path` in Pillow `mode`, resized to `size` (h, w)."""
    image = Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR)
    image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def make_image_folder(root: Path, per_class: int = 60, *, splits: bool = False, bad_file: bool = True) -> Path:
    """DIR/CLASS/*.{png,jpg,...} (or DIR/train/CLASS/..., DIR/test/CLASS/... with `splits`):
    mixed formats, sizes and colour layouts; with `bad_file`, one corrupt JPEG and a
    non-image file too. Returns DIR."""
    counts: dict[str, int] = {}
    for name, rgb in digit_images(per_class):
        index = counts[name] = counts.get(name, -1) + 1  # the file's name: the same with more images per class
        extension, mode = LAYOUTS[index % len(LAYOUTS)]
        split = ("test" if index % 5 == 0 else "train") if splits else ""
        save_image(rgb, root / split / name / f"{name}_{index:03d}.{extension}", mode, SIZES[index % len(SIZES)])
    if bad_file:
        first_class = root / ("train" if splits else "") / next(iter(DIGIT_CLASSES))
        (first_class / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
        (first_class / "notes.txt").write_text("not an image\n")
    return root


def write_table(path: Path, which: str = "wine", *, missing_cell: bool = True) -> Path:
    """A CSV file of scikit-learn's `which` table (wine, iris, breast_cancer): a header, an
    `id` column, the numeric features, a categorical `batch` column, and the label as
    strings in `species`; with `missing_cell`, one empty cell in the first data row."""
    import pandas as pd
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{which}")()
    frame = pd.DataFrame(bunch.data, columns=[str(c).replace(" ", "_") for c in bunch.feature_names])
    frame.insert(0, "id", [f"row-{i:04d}" for i in range(len(frame))])
    frame["batch"] = np.array(["north", "south", "east"])[np.arange(len(frame)) % 3]
    frame["species"] = np.array([str(name) for name in bunch.target_names])[bunch.target]
    if missing_cell:
        frame.iloc[0, 1] = None
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path
