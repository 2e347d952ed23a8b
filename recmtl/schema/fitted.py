"""The fitted schema: every column transform and label of a run, the batch-wise transform used by training,
evaluation and export, and its persistence in the run directory (``schema.json``, ``vocab/``)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recmtl.contracts import FeatureInfo
from recmtl.data.arrow import plain_array
from recmtl.files import atomic_path, write_json
from recmtl.rundir import SCHEMA, VOCAB, RunDir
from recmtl.schema.columns import CategoricalColumn, DenseColumn, ImageColumn, SequenceColumn, TextColumn
from recmtl.schema.labels import LabelColumn

SCHEMA_VERSION = 1


@dataclass
class Arrays:
    """One block of preprocessed rows: what the model and the loss read."""

    inputs: dict[str, np.ndarray]  # kind -> [n, n_features]
    labels: np.ndarray | None  # [n, n_tasks] float32
    mask: np.ndarray | None  # [n, n_tasks] bool
    group: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, idx: np.ndarray | slice) -> Arrays:
        def sub(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]
        return Arrays({k: v[idx] for k, v in self.inputs.items()}, sub(self.labels), sub(self.mask), sub(self.group))

    @staticmethod
    def concat(blocks: list[Arrays]) -> Arrays:
        if len(blocks) == 1:
            return blocks[0]
        def cat(items: list[np.ndarray | None]) -> np.ndarray | None:
            return None if items[0] is None else np.concatenate(items)
        return Arrays(
            {k: np.concatenate([b.inputs[k] for b in blocks]) for k in blocks[0].inputs},
            cat([b.labels for b in blocks]), cat([b.mask for b in blocks]), cat([b.group for b in blocks]),
        )


@dataclass
class FittedSchema:
    categorical: list[CategoricalColumn]
    dense: list[DenseColumn]
    labels: list[LabelColumn]
    group_column: str | None = None
    num_rows: int = 0
    image: list[ImageColumn] = field(default_factory=list)
    sequence: list[SequenceColumn] = field(default_factory=list)
    text: list[TextColumn] = field(default_factory=list)
    #: the fit pass's label summary of the training data per task (``recmtl.schema.summary``; not saved here:
    #: ``recmtl train`` keeps it in ``run.json``)
    label_summary: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)

    @property
    def feature_columns(self) -> list[str]:
        return ([c.name for c in self.categorical] + [d.name for d in self.dense] + [i.name for i in self.image]
                + [s.name for s in self.sequence] + [t.name for t in self.text])

    @property
    def sequence_width(self) -> int:
        """The last axis of the ``sequence`` input: the longest ``max_length`` of the sequence features."""
        return max((s.max_length for s in self.sequence), default=0)

    @property
    def text_width(self) -> int:
        """The last axis of the ``text`` input: the largest ``max_tokens`` of the text features."""
        return max((t.max_tokens for t in self.text), default=0)

    def label_slices(self) -> dict[str, tuple[int, int, bool]]:
        """Per task: (first column in ``Arrays.labels``, width, True when the label is one scalar)."""
        out, start = {}, 0
        for lab in self.labels:
            out[lab.task] = (start, lab.width, lab.kind != "multi")
            start += lab.width
        return out

    def feature_infos(self) -> dict[str, list[FeatureInfo]]:
        infos: dict[str, list[FeatureInfo]] = {}
        if self.categorical:
            infos["categorical"] = [
                FeatureInfo(c.name, "categorical", c.cardinality, {"embedding_dim": c.embedding_dim} if c.embedding_dim else {})
                for c in self.categorical
            ]
        if self.dense:
            infos["dense"] = [FeatureInfo(d.name, "dense") for d in self.dense]
        if self.image:
            infos["image"] = [FeatureInfo(i.name, "image", 0, {"channels": i.channels, "height": i.height, "width": i.width})
                              for i in self.image]
        if self.sequence:
            cat_pos = {c.name: j for j, c in enumerate(self.categorical)}
            def target(s: SequenceColumn) -> dict[str, Any]:
                if s.target is None:
                    return {}
                t = self.categorical[cat_pos[s.target]]
                return {"target": cat_pos[s.target], "target_name": t.name, "target_cardinality": t.cardinality,
                        "shared": s.vocabulary == s.target}
            infos["sequence"] = [
                FeatureInfo(s.name, "sequence", s.cardinality,
                            {"max_length": s.max_length, **({"embedding_dim": s.embedding_dim} if s.embedding_dim else {}),
                             **({"vocabulary": s.vocabulary} if s.vocabulary else {}), **target(s)})
                for s in self.sequence
            ]
        if self.text:
            infos["text"] = [
                FeatureInfo(t.name, "text", t.cardinality,
                            {"max_length": t.max_tokens, "ngrams": t.ngrams,
                             **({"embedding_dim": t.embedding_dim} if t.embedding_dim else {})})
                for t in self.text
            ]
        return infos

    def transform(self, batch: pa.RecordBatch | pa.Table, labels: bool = True) -> Arrays:
        """Arrow rows -> preprocessed numpy arrays, column-wise (no per-row Python)."""
        n = batch.num_rows
        inputs: dict[str, np.ndarray] = {}
        if self.categorical:
            cat = np.empty((n, len(self.categorical)), dtype=np.int64)
            for j, col in enumerate(self.categorical):
                cat[:, j] = col.ids(batch.column(col.name))
            inputs["categorical"] = cat
        if self.dense:
            dense = np.empty((n, len(self.dense)), dtype=np.float32)
            for j, col in enumerate(self.dense):
                dense[:, j] = col.values(batch.column(col.name))
            inputs["dense"] = dense
        if self.image:
            first = self.image[0]
            images = np.empty((n, len(self.image), first.channels, first.height, first.width), dtype=np.float32)
            for j, col in enumerate(self.image):
                images[:, j] = col.values(batch.column(col.name))
            inputs["image"] = images
        if self.sequence:
            width = self.sequence_width
            seq = np.empty((n, len(self.sequence), width), dtype=np.int64)
            for j, col in enumerate(self.sequence):
                seq[:, j] = col.sequence_ids(batch.column(col.name), width)
            inputs["sequence"] = seq
        if self.text:
            width = self.text_width
            text = np.empty((n, len(self.text), width), dtype=np.int64)
            for j, col in enumerate(self.text):
                ids = col.token_ids(batch.column(col.name))
                text[:, j, :col.max_tokens] = ids
                text[:, j, col.max_tokens:] = col.padding_id
            inputs["text"] = text
        y = mask = None
        if labels:
            width = sum(lab.width for lab in self.labels)
            y = np.empty((n, width), dtype=np.float32)
            mask = np.empty((n, width), dtype=bool)
            for lab, (start, w, _) in zip(self.labels, self.label_slices().values()):
                y[:, start:start + w], mask[:, start:start + w] = lab.read(batch)
        group = None
        if self.group_column and self.group_column in batch.schema.names:
            group = plain_array(batch.column(self.group_column)).to_numpy(zero_copy_only=False)
        return Arrays(inputs, y, mask, group)

    # ---- persistence -------------------------------------------------------------------------
    def save(self, run_dir: Path) -> None:
        vocab_dir = run_dir / VOCAB
        vocab_dir.mkdir(parents=True, exist_ok=True)

        def entry(c: CategoricalColumn, vocab_file: str) -> dict[str, Any]:
            out: dict[str, Any] = {"name": c.name, "value_type": c.value_type, "cardinality": c.cardinality}
            if c.hash_buckets:
                out["hash_buckets"] = c.hash_buckets
            else:
                out["vocab_file"] = vocab_file
                with atomic_path(run_dir / vocab_file) as tmp:
                    pq.write_table(pa.table({"value": pa.array(c.vocab)}), tmp)
            if c.embedding_dim:
                out["embedding_dim"] = c.embedding_dim
            return out

        cats = [entry(c, f"{VOCAB}/{j:04d}.parquet") for j, c in enumerate(self.categorical)]
        cat_entries = {c.name: e for c, e in zip(self.categorical, cats)}
        seqs = [({k: v for k, v in cat_entries[c.vocabulary].items() if k != "embedding_dim"}
                 | {"name": c.name, "vocabulary": c.vocabulary} if c.vocabulary else
                 entry(c, f"{VOCAB}/sequence_{j:04d}.parquet"))
                | {"max_length": c.max_length} | ({"embedding_dim": c.embedding_dim} if c.embedding_dim else {})
                | ({"target": c.target} if c.target else {})
                for j, c in enumerate(self.sequence)]
        write_json(run_dir / SCHEMA, {
            "schema_version": SCHEMA_VERSION,
            "num_rows": self.num_rows,
            "categorical": cats,
            "dense": [{"name": d.name, "mean": d.mean, "std": d.std, "fill": d.fill, "transform": d.transform,
                       "clip_low": d.clip_low, "clip_high": d.clip_high} for d in self.dense],
            "labels": [{"task": lab.task, "column": lab.column, "positive": lab.positive, "kind": lab.kind,
                        "classes": lab.classes, **({"target": lab.target} if lab.target else {})}
                       for lab in self.labels],
            "image": [{"name": i.name, "channels": i.channels, "height": i.height, "width": i.width} for i in self.image],
            "sequence": seqs,
            "text": [{"name": t.name, "hash_buckets": t.hash_buckets, "ngrams": t.ngrams, "max_tokens": t.max_tokens,
                      "embedding_dim": t.embedding_dim} for t in self.text],
            "group_column": self.group_column,
        })

    @classmethod
    def load(cls, run_dir: Path) -> FittedSchema:
        path = RunDir(run_dir).require(SCHEMA)
        meta = json.loads(path.read_text())
        def vocab_of(c: dict[str, Any]) -> np.ndarray | None:
            if "vocab_file" not in c:
                return None
            return pq.read_table(run_dir / c["vocab_file"]).column("value").to_numpy(zero_copy_only=False)
        cats = [CategoricalColumn(c["name"], c["value_type"], vocab_of(c), c.get("hash_buckets"), c.get("embedding_dim"))
                for c in meta["categorical"]]
        by_name = {c.name: c for c in cats}
        seqs = [SequenceColumn(c["name"], c["value_type"],
                               by_name[c["vocabulary"]].vocab if c.get("vocabulary") else vocab_of(c),
                               c.get("hash_buckets"), c.get("embedding_dim"), max_length=c["max_length"],
                               vocabulary=c.get("vocabulary"), target=c.get("target"))
                for c in meta.get("sequence", [])]
        return cls(
            categorical=cats,
            dense=[DenseColumn(**d) for d in meta["dense"]],
            labels=[LabelColumn(lab["task"], lab["column"], lab["positive"], lab.get("kind", "value"), lab.get("classes"),
                                target=lab.get("target")) for lab in meta["labels"]],
            group_column=meta.get("group_column"),
            num_rows=meta.get("num_rows", 0),
            image=[ImageColumn(**i) for i in meta.get("image", [])],
            sequence=seqs,
            text=[TextColumn(**t) for t in meta.get("text", [])],
        )
