"""`dataset=csv dataset.path=FILE dataset.label=COLUMN`: a table, one example per row.

The first row names the columns. Every column but the label and `drop` is a feature:
numeric where its cells are numbers, categorical where they are mostly not (or where
`categorical` names it). The model takes the raw columns by name and standardizes or
one-hot encodes them itself (`architectures.columns`), with statistics of the training
split, so the registered model predicts on a DataFrame of the CSV's columns.

A row's split is decided by a hash of its cells (`examples.role_by_hash`): the same in
every run, unmoved by added rows, and duplicate rows share one split. A missing cell
(empty, or one of pandas' markers such as `NA`) or a non-number in a numeric column
stops the run with one line naming its line and column, or `on_missing=drop` drops
its row and counts them.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from architectures.columns import encoded_width
from architectures.common import Column, InputSpec
from pipeline.datasets import examples
from pipeline.datasets.examples import Examples, Lineage
from pipeline.errors import DatasetError, one_line

log = logging.getLogger(__name__)

ON_MISSING = ("error", "drop")
# A categorical column with more categories than this, and than half the training rows,
# is more likely an id or free text than a feature: the run warns.
MANY_CATEGORIES = 50
# How many bad cells a message names (it counts them all).
NAMED_CELLS = 3


@dataclass(frozen=True)
class Cell:
    line: int  # in the file, the header being line 1
    column: str
    value: str | None  # None: missing

    def __str__(self) -> str:
        what = "missing value" if self.value is None else f"{self.value!r} is not a number"
        return f"line {self.line}, column {self.column!r}: {what}"


class CsvTable:
    """A CSV file with a header row, one example per row.

    Args:
        path: the file.
        label: the column to predict: class names (strings) or integers.
        name: the dataset's name in MLflow (experiment, registered model); default the file's stem.
        drop: columns that are not features (ids, free text, leaks of the label).
        categorical: columns to treat as categories even though they hold numbers (codes).
        test_fraction: the share of rows held out for test.
        val_fraction: the share of rows that validates.
        on_missing: "error" (stop at the first missing or unparsable cell, naming it) or
            "drop" (drop those rows, and say how many).
    """

    def __init__(self, path: str, label: str, name: str | None = None, drop: Sequence[str] = (),
                 categorical: Sequence[str] = (), test_fraction: float = 0.1, val_fraction: float = 0.1,
                 on_missing: str = "error") -> None:
        if on_missing not in ON_MISSING:
            raise ValueError(f"on_missing must be one of {ON_MISSING}. Received: {on_missing!r}")
        examples.check_fractions(test_fraction, val_fraction)
        self.path = Path(path).expanduser().absolute()
        self.label = str(label)
        self.name = name or self.path.stem
        self.drop, self.categorical = tuple(map(str, drop)), tuple(map(str, categorical))
        self.test_fraction, self.val_fraction = float(test_fraction), float(val_fraction)
        self.on_missing = on_missing

    def read(self, cache: str, roles: Sequence[str] = examples.ROLES) -> Examples:
        """The table's rows as ({column key: (1,) value}, label) examples per split."""
        del cache  # a table is parsed into memory whole; pipeline.data applies the mode
        frame = self.frame()
        feature_names = [c for c in frame.columns if c != self.label and c not in self.drop]
        if not feature_names:
            raise DatasetError(f"dataset.drop: no feature column is left in {self.path.name} "
                               f"(columns: {', '.join(frame.columns)})")
        kinds = {name: self._kind(name, frame[name]) for name in feature_names}
        values, bad = parse(frame, kinds, self.label)
        if bad:
            rows = sorted({cell.line for cell in bad})
            named = "; ".join(str(cell) for cell in bad[:NAMED_CELLS])
            if self.on_missing == "error":
                more = f" (and {len(bad) - NAMED_CELLS} more cells)" if len(bad) > NAMED_CELLS else ""
                raise DatasetError(f"dataset {self.name!r}: {self.path.name} {named}{more}; "
                                   "fix the file, or set dataset.on_missing=drop to drop such rows")
            log.warning("dataset %s: dropped %d of %d rows with a missing or unparsable cell (%s)", self.name,
                        len(rows), len(frame), named)
            keep = ~np.isin(np.arange(len(frame)) + 2, rows)
            values = {name: column[keep] for name, column in values.items()}
            frame = frame[keep]
        labels_text = values.pop(self.label)
        class_names = examples.class_order(set(labels_text.tolist()))
        if len(class_names) < 2:
            raise DatasetError(f"dataset.label: column {self.label!r} of {self.path.name} needs at least two "
                               f"classes. Found: {list(class_names)}")
        label_of = {name: index for index, name in enumerate(class_names)}
        labels = np.array([label_of[text] for text in labels_text], dtype=np.int64)

        row_keys = frame.astype(str).agg("\x1f".join, axis=1)  # the row's cells: its identity
        row_roles = np.array([examples.role_by_hash(key, self.test_fraction, self.val_fraction) for key in row_keys])
        for role in ("train", "test"):
            if not np.any(row_roles == role):
                raise DatasetError(f"dataset {self.name!r}: its {role} split is empty ({len(frame)} rows, "
                                   f"test_fraction={self.test_fraction}, val_fraction={self.val_fraction})")
        columns = describe_columns(values, kinds, row_roles == "train")
        many = max(MANY_CATEGORIES, np.sum(row_roles == "train") / 2)
        for column in columns:
            if column.dtype == "string" and len(column.vocabulary) > many:
                log.warning("dataset %s: column %r has %d categories, one input each: an id or free text? "
                            "If so, list it in dataset.drop", self.name, column.name, len(column.vocabulary))
        spec = InputSpec(shape=(encoded_width(columns),), dtype="float32", num_classes=len(class_names),
                         max_value=1.0, columns=columns)
        split_roles = [role for role in examples.ROLES if role in roles and np.any(row_roles == role)]
        return Examples(
            roles={role: tf.data.Dataset.from_tensor_slices(
                (column_arrays(values, columns, row_roles == role), labels[row_roles == role]))
                for role in split_roles},
            sizes={role: int(np.sum(row_roles == role)) for role in split_roles},
            input_spec=spec,
            class_names=class_names,
            lineage=self._lineage(),
        )

    def frame(self) -> pd.DataFrame:
        """The file's cells as text (NaN where missing)."""
        return read_frame(self.path, {"dataset.label": [self.label], "dataset.drop": self.drop,
                                      "dataset.categorical": self.categorical})

    def _kind(self, name: str, cells: pd.Series) -> str:
        """"float32" where most present cells are numbers, else "string"."""
        if name in self.categorical:
            return "string"
        present = cells.dropna()
        numbers = pd.to_numeric(present, errors="coerce").notna().sum()
        return "float32" if numbers * 2 > len(present) else "string"

    def _lineage(self) -> Lineage:
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        return Lineage(self.name, digest[:8], "csv", str(self.path), digest)


def read_frame(path: Path, required: Mapping[str, Sequence[str]], flag: str = "dataset.path") -> pd.DataFrame:
    """The CSV file's cells as text (NaN where missing: empty, or one of pandas' markers
    such as `NA`), with one-line errors for what cannot be read, naming `flag` (the key
    that gave `path`). `required`: the key that names them -> columns the header must have."""
    if not path.is_file():
        raise DatasetError(f"{flag}: {path} " + ("is not a file" if path.exists() else "does not exist"))
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            header = [name.strip() for name in next(csv.reader(file), [])]
        frame = pd.read_csv(path, dtype=str, skipinitialspace=True, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{flag}: {path.name} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, csv.Error, ValueError) as error:
        raise DatasetError(f"{flag}: {path.name} is not a readable CSV file: {one_line(error)}") from None
    if len(set(header)) != len(header) or "" in header:
        raise DatasetError(f"{flag}: the first row of {path.name} must name every column once. "
                           f"Received: {', '.join(header)}")
    frame.columns = header
    for flag, names in required.items():
        unknown = [name for name in names if name not in frame.columns]
        if unknown:
            raise DatasetError(f"{flag}: {path.name} has no column {', '.join(map(repr, unknown))} "
                               f"(its header: {', '.join(frame.columns)})")
    if frame.empty:
        raise DatasetError(f"{flag}: {path.name} has a header but no rows")
    return frame


def parse(frame: pd.DataFrame, kinds: Mapping[str, str], label: str | None) -> tuple[dict[str, np.ndarray], list[Cell]]:
    """Each feature column as float32 or str values, the label (if named) as str, and the
    cells that are missing or not numbers where numbers are expected (row order)."""
    values: dict[str, np.ndarray] = {}
    bad: list[Cell] = []
    for name, kind in [*kinds.items(), *([(label, "label")] if label else [])]:
        cells = frame[name]
        missing = cells.isna().to_numpy()
        if kind == "float32":
            numbers = pd.to_numeric(cells.str.strip(), errors="coerce")
            unparsable = numbers.isna().to_numpy() & ~missing
            values[name] = numbers.to_numpy(dtype=np.float32)
        else:
            unparsable = np.zeros(len(cells), dtype=bool)
            values[name] = cells.fillna("").str.strip().to_numpy(dtype=str)
        for row in np.flatnonzero(missing | unparsable):
            bad.append(Cell(int(row) + 2, name, None if missing[row] else str(cells.iloc[row])))
    bad.sort(key=lambda cell: (cell.line, list(frame.columns).index(cell.column)))
    return values, bad


def describe_columns(values: Mapping[str, np.ndarray], kinds: Mapping[str, str],
                     train: np.ndarray) -> tuple[Column, ...]:
    """Each feature column's model input: key, dtype and statistics of the training rows."""
    columns, keys = [], set()
    for name, kind in kinds.items():
        key = input_key(name, keys)
        keys.add(key)
        if kind == "float32":
            column = values[name][train].astype(np.float64)
            columns.append(Column(name, key, kind, mean=float(column.mean()), variance=float(column.var())))
        else:
            columns.append(Column(name, key, kind, vocabulary=tuple(sorted(set(values[name][train].tolist())))))
    return tuple(columns)


def column_arrays(values: Mapping[str, np.ndarray], columns: Sequence[Column],
                  rows: np.ndarray) -> dict[str, np.ndarray]:
    """{column key: (rows, 1) array}: what the model's inputs take."""
    return {column.key: values[column.name][rows].reshape(-1, 1) for column in columns}


def input_key(name: str, taken: set[str]) -> str:
    """`name` as a model input name: letters, digits and `_`, not starting with a digit,
    and not among `taken`."""
    key = re.sub(r"\W", "_", name, flags=re.ASCII) or "column"
    if key[0].isdigit():
        key = f"c_{key}"
    candidate, suffix = key, 2
    while candidate in taken:
        candidate, suffix = f"{key}_{suffix}", suffix + 1
    return candidate
