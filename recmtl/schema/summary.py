"""The label summary: per task and split, labelled rows and the positive rate (0/1 labels), the class counts
(class labels), each attribute's positive rate (multilabel) or mean ± std (numbers); the checks that stop a
run whose training or validation labels have one class or none; and streaming moments (``Moments``) for the
fitted target statistics of the heads.

The training split is summarised by the fit pass (``recmtl.schema.fit``); validation and test by
:func:`split_summary`, one pass over the label columns only. ``recmtl train`` prints the summary and keeps
it in ``run.json`` under ``labels``."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recmtl.data.arrow import plain_array
from recmtl.data.parquet import ParquetSource
from recmtl.errors import DataError
from recmtl.schema.labels import LabelColumn

#: the most distinct class labels a class task may have
MAX_CLASSES = 100_000
#: class shares printed per task and split (the JSON summary keeps them all)
SHOWN_CLASSES = 8


class Moments:
    """Count, mean, standard deviation (population), min and max of a stream of numbers, merged batch by batch
    (Chan et al.'s pairwise update, stable for large means)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if not len(x):
            return
        n, mean = len(x), float(x.mean())
        m2 = float(np.square(x - mean).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))

    def merge(self, other: Moments) -> None:
        """Add ``other``'s numbers (Chan et al.'s parallel update): the same result for the same order of merges."""
        if not other.count:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / total
        self.m2 += other.m2 + delta * delta * self.count * other.count / total
        self.count = total
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)

    @property
    def std(self) -> float:
        return math.sqrt(max(self.m2, 0.0) / self.count) if self.count else 0.0

    def as_dict(self) -> dict[str, float]:
        """``{count, mean, std, min, max}`` (only ``count`` when there were no values)."""
        if not self.count:
            return {"count": 0}
        return {"count": self.count, "mean": self.mean, "std": self.std, "min": self.min, "max": self.max}


class LabelStats:
    """One task's labels over one split, batch by batch: what the summary, the label checks and the fitted
    classes of a class label need."""

    def __init__(self, label: LabelColumn) -> None:
        self.label = label
        self.rows = 0
        self.labelled = 0  # rows with a label (multilabel: with at least one labelled attribute)
        self.moments = Moments()  # value labels
        self.positives = self.zeros = 0  # value labels: entries equal to 1 and to 0
        self.distinct: set[Any] = set()  # value labels: up to 17 distinct values (for Head.label_problem)
        self.counts: dict[Any, int] = {}  # class labels: count per raw value (int or string)
        width = label.width if label.kind == "multi" else 0
        self.attr_labelled, self.attr_positives, self.attr_zeros = (np.zeros(width, np.int64) for _ in range(3))

    def add(self, batch: pa.RecordBatch | pa.Table) -> tuple[np.ndarray, np.ndarray] | None:
        """Count one batch; returns its labels and mask (``LabelColumn.read``), None for a class label (counted from
        its raw values, as its classes may not be fitted yet)."""
        self.rows += batch.num_rows
        lab = self.label
        if lab.kind == "class":
            arr = plain_array(batch.column(lab.column))
            if not (pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type)
                    or pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
                raise DataError(f"label column '{lab.column}' of task '{lab.task}' has type {arr.type}; a class label "
                                "is an int or a string")
            if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
                arr = arr.cast(pa.int64())
            self.labelled += len(arr) - arr.null_count
            counts = pc.value_counts(arr.drop_null())
            for value, count in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
                self.counts[value] = self.counts.get(value, 0) + count
            if len(self.counts) > MAX_CLASSES:
                raise DataError(f"label column '{lab.column}' of task '{lab.task}' has more than {MAX_CLASSES:,} "
                                "distinct class labels")
            return None
        y, mask = lab.read(batch)
        if lab.kind == "multi":
            self.labelled += int(mask.any(1).sum())
            self.attr_labelled += mask.sum(0)
            self.attr_positives += (mask & (y == 1)).sum(0)
            self.attr_zeros += (mask & (y == 0)).sum(0)
            if len(self.distinct) <= 16:
                self.distinct.update(np.unique(y[mask]).tolist())
            return y, mask
        values = y[:, 0][mask[:, 0]]
        self.labelled += len(values)
        self.moments.add(values)
        self.positives += int((values == 1).sum())
        self.zeros += int((values == 0).sum())
        if len(self.distinct) <= 16:
            self.distinct.update(np.unique(values).tolist())
        return y, mask

    def merge(self, other: LabelStats) -> None:
        """Add the counts of ``other`` (the same task, other rows); the sharded fit pass merges one per row group,
        in row-group order, so the result does not depend on how many processes counted them."""
        lab = self.label
        self.rows += other.rows
        self.labelled += other.labelled
        self.moments.merge(other.moments)
        self.positives += other.positives
        self.zeros += other.zeros
        if len(self.distinct) <= 16:
            self.distinct.update(other.distinct)
        for value, count in other.counts.items():
            self.counts[value] = self.counts.get(value, 0) + count
        if len(self.counts) > MAX_CLASSES:
            raise DataError(f"label column '{lab.column}' of task '{lab.task}' has more than {MAX_CLASSES:,} "
                            "distinct class labels")
        self.attr_labelled += other.attr_labelled
        self.attr_positives += other.attr_positives
        self.attr_zeros += other.attr_zeros

    @property
    def binary(self) -> bool:
        """Value labels that are all 0 or 1 (and at least one)."""
        return self.label.kind == "value" and self.labelled > 0 and self.positives + self.zeros == self.labelled

    def classes(self, num_classes: int | None) -> list[Any]:
        """The classes of a class label, in id order: the sorted distinct values; with ``num_classes`` K, ints
        within 0..K-1 are class ids and the classes are 0..K-1 (also those absent from the data), other labels
        must have exactly K distinct values."""
        lab = self.label
        values = sorted(self.counts)
        if num_classes is None:
            return values
        k = int(num_classes)
        if all(isinstance(v, int) for v in values) and all(0 <= v < k for v in values):
            return list(range(k))
        if len(values) != k:
            shown = ", ".join(map(str, values[:10])) + (", ..." if len(values) > 10 else "")
            ids = f" and are not class ids 0..{k - 1}" if all(isinstance(v, int) for v in values) else ""
            raise DataError(f"task '{lab.task}': params.num_classes is {k} but label column '{lab.column}' has "
                            f"{len(values)} distinct values in the training data ({shown}){ids}")
        return values

    def summary(self) -> dict[str, Any]:
        """The JSON form: ``rows``, ``labelled``, and ``positives``/``positive_rate`` (0/1 labels) or
        ``mean``/``std``/``min``/``max`` (other numbers), ``classes`` (class label: count per class, in class
        order when the classes are fitted) or ``attributes`` (multilabel: ``labelled``, ``positives``,
        ``positive_rate`` per attribute)."""
        lab = self.label
        out: dict[str, Any] = {"rows": self.rows, "labelled": self.labelled}
        if lab.kind == "class":
            order = lab.classes if lab.classes is not None else sorted(self.counts)
            out["classes"] = {str(c): int(self.counts.get(c, 0)) for c in order}
        elif lab.kind == "multi":
            out["attributes"] = {
                str(name): {"labelled": int(n), "positives": int(p), "positive_rate": _rate(int(p), int(n))}
                for name, n, p in zip(lab.classes, self.attr_labelled, self.attr_positives)}
        elif self.binary:
            out |= {"positives": self.positives, "positive_rate": _rate(self.positives, self.labelled)}
        else:
            out |= {k: v for k, v in self.moments.as_dict().items() if k != "count"}
        return out


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def check_labels(label: LabelColumn, summary: dict[str, Any], split: str, binary: bool, spec: str = "") -> None:
    """A DataError naming task, split and counts when the labels of ``split`` (``training``, ``validation``) have one
    class or none: no labelled rows, a 0/1 label (``binary``: as in the training data) without positives or
    without negatives, one class of a class label, a multilabel attribute with one class, or (training only) one
    value of a numeric label."""
    task, n, rows = label.task, summary["labelled"], summary["rows"]
    where = f"in the {split} data"
    if n == 0:
        raise DataError(f"task '{task}' has no labelled rows {where}: column '{label.column}' is null on all "
                        f"{rows:,} rows{' of ' + spec if spec else ''}")
    if label.kind == "class":
        present = [c for c, k in summary["classes"].items() if k]
        if len(present) < 2:
            raise DataError(f"task '{task}' has one class ('{present[0]}') {where} (all {n:,} labelled rows); a "
                            "class label needs at least two")
    elif label.kind == "multi":
        for name, a in summary["attributes"].items():
            if a["labelled"] == 0:
                raise DataError(f"attribute '{name}' of task '{task}' has no labelled values {where}")
            if a["positives"] in (0, a["labelled"]):
                which = "no positive" if a["positives"] == 0 else "only positive"
                raise DataError(f"attribute '{name}' of task '{task}' has {which} labels {where} "
                                f"({a['positives']:,} of {a['labelled']:,} labelled values are 1)")
    elif binary:
        positives = summary.get("positives", 0)
        if positives in (0, n):
            which = "no positive" if positives == 0 else "only positive"
            raise DataError(f"task '{task}' has {which} labels {where} ({positives:,} of {n:,} labelled rows are 1); "
                            f"check label column '{label.column}'"
                            + (f" and positive: {label.positive}" if label.positive is not None else ""))
    elif split == "training" and summary["min"] == summary["max"]:
        raise DataError(f"task '{task}' has one label value ({summary['min']:g}) on all {n:,} labelled rows {where}: "
                        "nothing to learn")


def split_summary(labels: list[LabelColumn], source: ParquetSource, read_rows: int) -> dict[str, dict[str, Any]]:
    """Per task, the summary of ``source``'s labels: one pass reading the label columns only. A class value that
    is not one of the fitted classes is an error here, before training."""
    stats = {lab.task: LabelStats(lab) for lab in labels}
    columns = list(dict.fromkeys(c for lab in labels for c in lab.columns))
    for batch in source.batches(read_rows=read_rows, columns=columns):
        for st in stats.values():
            st.add(batch)
    out = {}
    for lab in labels:
        st = stats[lab.task]
        if lab.kind == "class":
            known = set(lab.classes)
            unknown = [v for v in st.counts if v not in known]
            if unknown:
                shown = ", ".join(map(str, lab.classes[:20])) + (", ..." if len(lab.classes) > 20 else "")
                raise DataError(f"label column '{lab.column}' of task '{lab.task}' in {source.spec}: class "
                                f"{unknown[0]!r} was not in the training data (classes: {shown})")
        out[lab.task] = st.summary()
    return out


def format_summary(labels: dict[str, dict[str, dict[str, Any]]], heads: dict[str, str]) -> str:
    """The printed form of ``{task: {split: summary}}``: a line per task and split."""
    rows = []
    for task, splits in labels.items():
        for j, (split, s) in enumerate(splits.items()):
            count = f"{s['labelled']:,}" + (f" of {s['rows']:,}" if s["labelled"] != s["rows"] else "")
            rows.append((f"{task} ({heads.get(task, '?')})" if j == 0 else "", split, count,
                         _describe(s) if s["labelled"] else "no labels"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(["labels (per task and split: labelled rows, then the positive rate, class shares or mean ± std):"]
                     + ["  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows])


def _describe(s: dict[str, Any]) -> str:
    def pct(rate: float | None) -> str:
        return "-" if rate is None else f"{100 * rate:.1f}%" if rate >= 0.01 else f"{100 * rate:.2g}%"
    if "classes" in s:
        shown = [f"{c}: {pct(k / s['labelled'])}" for c, k in list(s["classes"].items())[:SHOWN_CLASSES]]
        more = len(s["classes"]) - SHOWN_CLASSES
        return ", ".join(shown) + (f" and {more} more classes" if more > 0 else "")
    if "attributes" in s:
        shown = [f"{a}: {pct(v['positive_rate'])}" for a, v in list(s["attributes"].items())[:SHOWN_CLASSES]]
        more = len(s["attributes"]) - SHOWN_CLASSES
        return ", ".join(shown) + f" positive{f' and {more} more attributes' if more > 0 else ''}"
    if "positive_rate" in s:
        return f"{pct(s['positive_rate'])} positive"
    return f"mean {s['mean']:.4g} ± {s['std']:.4g}"


def run_summary(labels: list[LabelColumn], train: dict[str, dict[str, Any]], sources: dict[str, ParquetSource | None],
                read_rows: int) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {split: summary}}``: ``train`` (the fit pass's ``FittedSchema.label_summary``) and each given source
    (``validation``, ``test``; None: absent), one pass over its label columns. The validation labels are checked
    as the training labels are (:func:`check_labels`): a DataError before training."""
    out: dict[str, dict[str, dict[str, Any]]] = {lab.task: {"train": train[lab.task]} for lab in labels}
    for split, source in sources.items():
        if source is None:
            continue
        summary = split_summary(labels, source, read_rows)
        for lab in labels:
            out[lab.task][split] = summary[lab.task]
            if split == "validation":
                check_labels(lab, summary[lab.task], split, "positive_rate" in train[lab.task], source.spec)
    return out
