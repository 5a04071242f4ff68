"""`dataset=image_folder dataset.path=DIR`: a folder of images, one subfolder per class.

    DIR/cat/001.jpg, DIR/dog/x.png, ...                    test and validation by fraction
    DIR/train/cat/..., DIR/test/cat/..., DIR/val/cat/...   splits of its own (val optional)

Without split folders, a file's split is decided by a hash of its path relative to DIR
(`examples.role_by_hash`), so adding images never moves the others between splits.
Every image is decoded once, in parallel (tf.data), resized to `image_size` and kept
as uint8, as `dataset.cache` says: arrays in memory (`memory`); a cache under
`data_dir`, reused by every later run on the unchanged folder (`disk`, for folders
larger than RAM); or nothing kept, decoded again each epoch (`none`). That first pass
also finds the files that cannot be decoded: `on_bad_file=error` stops with one line
naming them, `skip` trains on the rest.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from architectures.common import InputSpec
from pipeline import quiet
from pipeline.datasets import examples, images
from pipeline.datasets.examples import Examples, Lineage
from pipeline.errors import DatasetError

log = logging.getLogger(__name__)

SPLIT_FOLDERS = {"train": "train", "test": "test", "val": "val", "validation": "val"}
ON_BAD_FILE = ("error", "skip")
# How many unreadable files an error names (it counts them all).
NAMED_BAD_FILES = 5
# Changes whenever what the disk cache holds changes: an older cache is then not read.
DISK_CACHE_FORMAT = 1
# Files one map call decodes (`ImageFolder._decoded_chunks`).
DECODE_CHUNK = 64

# For the functions handed to tf.data: none branches on a tensor, so AutoGraph would only
# rewrite (or fail to parse) their source.
graph_as_written = tf.autograph.experimental.do_not_convert


@dataclass(frozen=True)
class ImageFile:
    path: str  # absolute
    relative: str  # to the dataset's folder, with "/" separators: names it in messages and in the digest
    label: int


class ImageFolder:
    """A folder of images in the class-per-subfolder layout Keras and TFDS use.

    Args:
        path: the folder.
        name: the dataset's name in MLflow (experiment, registered model); default the folder's name.
        image_size: [height, width] every image is resized to; None: the size all the
            images share (an error, naming two sizes, if they differ).
        channels: 3 (RGB) or 1 (grayscale); other layouts are converted.
        test_fraction: of the images, without a `test/` folder, the share held out for test.
        val_fraction: of the images, without a `val/` folder, the share that validates.
        on_bad_file: "error" (stop, naming the files that cannot be decoded) or "skip".
        data_dir: where `cache=disk` keeps its cache; None: TFDS's default
            (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
    """

    def __init__(self, path: str, name: str | None = None, image_size: Sequence[int] | None = None,
                 channels: int = 3, test_fraction: float = 0.1, val_fraction: float = 0.1,
                 on_bad_file: str = "error", data_dir: str | None = None) -> None:
        if image_size is not None and (len(image_size) != 2 or any(int(d) < 1 for d in image_size)):
            raise ValueError(f"image_size must be [height, width] of positive ints or null. Received: "
                             f"{list(image_size)}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3. Received: {channels}")
        if on_bad_file not in ON_BAD_FILE:
            raise ValueError(f"on_bad_file must be one of {ON_BAD_FILE}. Received: {on_bad_file!r}")
        examples.check_fractions(test_fraction, val_fraction)
        self.path = Path(path).expanduser().absolute()
        self.name = name or self.path.name
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.channels = int(channels)
        self.test_fraction, self.val_fraction = float(test_fraction), float(val_fraction)
        self.on_bad_file = on_bad_file
        self.data_dir = data_dir

    def read(self, cache: str, roles: Sequence[str] = examples.ROLES) -> Examples:
        """Decode the folder's `roles` (or read them from its disk cache) into `Examples`."""
        files, class_names, ignored = self.list_files()
        if ignored:
            log.info("dataset %s: ignored %d file%s without an image extension (%s), e.g. %s", self.name,
                     ignored[0], "" if ignored[0] == 1 else "s", ", ".join(sorted(images.IMAGE_EXTENSIONS)),
                     ignored[1])
        size = self.image_size or self.common_size(files)
        # The digest stats every file: on a thread, beside the decoding (the disk cache's key needs it first).
        with concurrent.futures.ThreadPoolExecutor(1) as pool, quiet.image_decoding():
            digest = pool.submit(digest_of, {f.relative: f.path for role_files in files.values() for f in role_files})
            if cache == "disk":  # the cache holds every split, whichever this caller reads
                decoded, kept = self._read_disk_cache(files, size, digest.result())
            else:
                files = {role: role_files for role, role_files in files.items() if role in roles}
                decoded, kept = self._decode(files, size, keep_images=cache == "memory")
            digest = digest.result()
        files = {role: role_files for role, role_files in files.items() if role in roles}
        skipped = tuple(sorted(f.relative for role, role_files in files.items()
                               for index, f in enumerate(role_files) if index not in kept[role]))
        self._check_bad_files(skipped, sum(len(role_files) for role_files in files.values()))
        pipelines = {}
        for role, role_files in files.items():
            if not kept[role]:
                raise DatasetError(f"dataset {self.name!r}: no readable image left in its {role} split")
            pipelines[role] = decoded[role] if decoded is not None else self._streamed(
                [role_files[index] for index in sorted(kept[role])], size)
        return Examples(
            roles=pipelines,
            sizes={role: len(kept[role]) for role in files},
            input_spec=InputSpec(shape=(*size, self.channels), dtype="uint8", num_classes=len(class_names)),
            class_names=class_names,
            lineage=Lineage(self.name, digest[:8], "image_folder", str(self.path), digest),
            skipped=skipped,
        )

    # -- the folder --------------------------------------------------------------------
    def list_files(self) -> tuple[dict[str, list[ImageFile]], tuple[str, ...], tuple[int, str] | None]:
        """The image files of each split, the class names, and (count, an example) of the
        files without an image extension."""
        if not self.path.is_dir():
            raise DatasetError(f"dataset.path: {self.path} is not a folder" if self.path.exists()
                               else f"dataset.path: {self.path} does not exist")
        subfolders = sorted(p for p in self.path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if (self.path / "train").is_dir():  # DIR/train/CLASS/..., DIR/test/..., DIR/val/...
            unknown = [p.name for p in subfolders if p.name not in SPLIT_FOLDERS]
            if unknown:
                raise DatasetError(f"dataset.path: {self.path} has a train/ folder, so its folders must be "
                                   f"train/, test/ and val/; it also has {', '.join(unknown)}/. Received: {self.path}")
            split_folders = {SPLIT_FOLDERS[p.name]: p for p in subfolders}
        else:
            split_folders = {"": self.path}
        found: dict[str, list[tuple[str, str, str]]] = {}  # split -> (path, relative, class)
        ignored_count, ignored_example = 0, ""
        root = str(self.path)
        for split, folder in split_folders.items():
            for class_folder in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
                # Strings, not Path objects: a folder of 100k photos is listed in a blink.
                for directory, dirs, names in os.walk(class_folder, followlinks=True):
                    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                    prefix = os.path.relpath(directory, root).replace(os.sep, "/") + "/"
                    for file_name in sorted(names):
                        if file_name.startswith("."):
                            continue
                        if os.path.splitext(file_name)[1].lower() in images.IMAGE_EXTENSIONS:
                            found.setdefault(split, []).append((os.path.join(directory, file_name),
                                                                prefix + file_name, class_folder.name))
                        else:
                            ignored_count, ignored_example = ignored_count + 1, ignored_example or prefix + file_name
        train_split = "train" if "train" in split_folders else ""
        class_names = examples.class_order({c for _, _, c in found.get(train_split, [])})
        if len(class_names) < 2:
            raise DatasetError(f"dataset.path: {split_folders[train_split]} needs at least two class folders "
                               f"with images in them (DIR/CLASS/*.jpg). Found: {list(class_names)}")
        label_of = {name: index for index, name in enumerate(class_names)}
        files: dict[str, list[ImageFile]] = {"train": [], "val": [], "test": []}
        # Test and validation images come from the training images by hash where there
        # is no folder of their own.
        test_share = 0.0 if "test" in split_folders else self.test_fraction
        val_share = 0.0 if "val" in split_folders else self.val_fraction
        for split, entries in found.items():
            for path, relative, class_name in entries:
                if class_name not in label_of:
                    raise DatasetError(f"dataset.path: class {class_name!r} of {relative} has no images in the "
                                       f"train split. Received: {self.path}")
                role = split if split in ("test", "val") else examples.role_by_hash(relative, test_share, val_share)
                files[role].append(ImageFile(path, relative, label_of[class_name]))
        for role in ("train", "test"):
            if not files[role]:
                raise DatasetError(f"dataset {self.name!r}: its {role} split is empty ({self.path}; "
                                   f"test_fraction={self.test_fraction}): add images or a {role}/ folder")
        if not files["val"]:
            del files["val"]
        return files, class_names, (ignored_count, ignored_example) if ignored_count else None

    def common_size(self, files: dict[str, list[ImageFile]]) -> tuple[int, int]:
        """The (height, width) every image has, read from the files' headers."""
        sizes: dict[tuple[int, int], str] = {}
        for role_files in files.values():
            for f in role_files:
                size = images.image_size_of(f.path)
                if size is not None and size not in sizes:
                    sizes[size] = f.relative
                    if len(sizes) > 1:
                        (first, a), (second, b) = sizes.items()
                        raise DatasetError(
                            f"dataset.image_size is needed: the images differ in size ({first[0]}x{first[1]} "
                            f"{a}, {second[0]}x{second[1]} {b}); set e.g. dataset.image_size=[{first[0]},{first[1]}]")
        if not sizes:
            raise DatasetError(f"dataset {self.name!r}: no image in {self.path} could be read")
        return next(iter(sizes))

    def _check_bad_files(self, skipped: Sequence[str], total: int) -> None:
        if not skipped:
            return
        named = ", ".join(skipped[:NAMED_BAD_FILES]) + (", ..." if len(skipped) > NAMED_BAD_FILES else "")
        if self.on_bad_file == "error":
            raise DatasetError(f"dataset {self.name!r}: {len(skipped)} of {total} image files cannot be decoded "
                               f"({named}); fix or remove them, or set dataset.on_bad_file=skip to train on the rest")
        log.warning("dataset %s: skipped %d of %d image files that cannot be decoded (%s); the list is logged "
                    "to the run as skipped_files.txt", self.name, len(skipped), total, named)

    # -- decoding ----------------------------------------------------------------------
    def _decoded(self, role_files: Sequence[ImageFile], size: tuple[int, int]) -> tf.data.Dataset:
        """(index, image, label) of each file that decodes, in order; the others are left out."""
        channels = self.channels
        load = graph_as_written(lambda index, path, label: (index, images.load(path, size, channels), label))
        return file_slices(role_files).map(load, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()

    def _decoded_chunks(self, role_files: Sequence[ImageFile], size: tuple[int, int]) -> tf.data.Dataset:
        """(indices, images, labels) of the files DECODE_CHUNK at a time, in order: one map
        call decodes a chunk, where a call per file spends a third of the decoding time on
        tf.data's per-element work. A file that cannot be decoded fails its chunk."""
        image = tf.TensorSpec((*size, self.channels), tf.uint8)
        channels = self.channels

        @graph_as_written
        def decode(indices, chunk_paths, chunk_labels):
            chunk = tf.map_fn(lambda path: images.load(path, size, channels), chunk_paths, fn_output_signature=image)
            return indices, chunk, chunk_labels

        return file_slices(role_files).batch(DECODE_CHUNK).map(decode, num_parallel_calls=tf.data.AUTOTUNE)

    def _decode(self, files: dict[str, list[ImageFile]], size: tuple[int, int],
                keep_images: bool) -> tuple[dict[str, tf.data.Dataset] | None, dict[str, set[int]]]:
        """Decode every file once, every split in one parallel pass: the decoded examples
        of each role (if `keep_images`) and the indices (in its role) of the files that
        decoded. Files are decoded in chunks; the files of a chunk that failed are decoded
        again one by one, which leaves out only those that cannot be decoded."""
        roles = list(files)
        everything = [f for role in roles for f in files[role]]
        starts = np.cumsum([0] + [len(files[role]) for role in roles])  # role r: indices starts[r]:starts[r + 1]
        indices, image_batches, label_batches = [], [], []

        def collect(ds: tf.data.Dataset) -> None:
            if not keep_images:
                ds = ds.map(graph_as_written(lambda index, image, label: (index, tf.zeros([0], tf.uint8), label)))
            for index, image, label in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
                indices.append(index)
                image_batches.append(image)
                label_batches.append(label)

        collect(self._decoded_chunks(everything, size).ignore_errors())
        seen = np.zeros(len(everything), bool)
        for index in indices:
            seen[index] = True
        if not seen.all():  # chunks with a bad file in them: file by file
            retry = np.flatnonzero(~seen)
            before = len(indices)
            collect(self._decoded([everything[i] for i in retry], size).batch(DECODE_CHUNK))
            indices[before:] = [retry[index] for index in indices[before:]]  # back to indices in `everything`
        indices = np.concatenate(indices) if indices else np.zeros([0], np.int64)
        order = np.argsort(indices, kind="stable")  # file order, the retried files included
        indices = indices[order]
        if keep_images and len(indices):
            all_images, all_labels = np.concatenate(image_batches)[order], np.concatenate(label_batches)[order]
        kept, decoded = {}, {}
        for number, role in enumerate(roles):
            mine = (indices >= starts[number]) & (indices < starts[number + 1])
            kept[role] = set((indices[mine] - starts[number]).tolist())
            if keep_images and mine.any():
                decoded[role] = tf.data.Dataset.from_tensor_slices((all_images[mine], all_labels[mine]))
        return (decoded if keep_images else None), kept

    def _streamed(self, role_files: Sequence[ImageFile], size: tuple[int, int]) -> tf.data.Dataset:
        """The files, decoded as they are read (`cache=none`): only readable ones are passed
        (one that became unreadable since fails the epoch)."""
        return self._decoded_chunks(role_files, size).map(
            graph_as_written(lambda indices, chunk, labels: (chunk, labels))).unbatch()

    def _read_disk_cache(self, files: dict[str, list[ImageFile]], size: tuple[int, int],
                         digest: str) -> tuple[dict[str, tf.data.Dataset] | None, dict[str, set[int]]]:
        """The decoded examples saved under `data_dir` for this exact folder, size and
        channels; written first (to a temporary folder, then renamed: a killed run leaves
        no half cache) when there is none."""
        key = hashlib.sha256(json.dumps([DISK_CACHE_FORMAT, digest, size, self.channels, self.test_fraction,
                                         self.val_fraction]).encode()).hexdigest()[:16]
        directory = Path(data_root(self.data_dir)) / "image_folder" / f"{self.name}-{key}"
        manifest = directory / "manifest.json"
        if not manifest.exists():
            directory.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
            try:
                kept = {}
                for role, role_files in files.items():
                    self._decoded(role_files, size).save(str(staging / role))
                    indices = tf.data.Dataset.load(str(staging / role)).map(
                        graph_as_written(lambda index, image, label: index))
                    kept[role] = sorted(int(i) for batch in indices.batch(4096).as_numpy_iterator() for i in batch)
                if self.on_bad_file == "error" and any(len(kept[role]) < len(files[role]) for role in files):
                    shutil.rmtree(staging, ignore_errors=True)  # read() names the files: no cache of a folder to fix
                    return None, {role: set(indices) for role, indices in kept.items()}
                (staging / "manifest.json").write_text(json.dumps({"path": str(self.path), "kept": kept}))
                try:
                    staging.rename(directory)
                except OSError:  # another run wrote it first: the same data
                    shutil.rmtree(staging, ignore_errors=True)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            log.info("dataset %s: decoded images cached in %s", self.name, directory)
        else:
            log.info("dataset %s: reading decoded images from %s", self.name, directory)
        kept = {role: set(indices) for role, indices in json.loads(manifest.read_text())["kept"].items()}
        decoded = {role: tf.data.Dataset.load(str(directory / role)).map(
            graph_as_written(lambda index, image, label: (image, label))) for role in files}
        return decoded, kept


def file_slices(role_files: Sequence[ImageFile]) -> tf.data.Dataset:
    """(index, path, label) of each file."""
    labels = np.array([f.label for f in role_files], dtype=np.int64)
    return tf.data.Dataset.from_tensor_slices((np.arange(len(role_files), dtype=np.int64),
                                               tf.constant([f.path for f in role_files], tf.string), labels))


def digest_of(files: Mapping[str, str]) -> str:
    """sha256 over each file's relative path, size and modification time (`files`:
    relative path -> path): a changed, added or removed file changes it, a folder moved
    elsewhere does not, and no contents are read."""
    lines = []
    for relative, path in sorted(files.items()):
        stat = os.stat(path)
        lines.append(f"{relative}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def data_root(data_dir: str | None) -> str:
    """`data_dir`, else TFDS's default data directory."""
    return str(Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser())
