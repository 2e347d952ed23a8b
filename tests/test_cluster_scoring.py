"""The Arrow scoring function inside a real distributed engine: Dask's local cluster (127.0.0.1)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_export_score import exported, holey_data  # noqa: F401  (module-scoped fixtures)

dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.cluster  # with tests/test_cluster_recipes.py: `pytest -m "not cluster"` leaves them out


def test_score_batches_under_dask_local_cluster(exported, holey_data, tmp_path):  # noqa: F811
    from recmtl.serving.score import score_batches
    model = str(exported / "model.onnx")

    def score_partition(frame: pd.DataFrame) -> pd.DataFrame:
        batch = pa.RecordBatch.from_pandas(frame, preserve_index=False)
        scored = pa.Table.from_batches(list(score_batches(model, [batch], keep=["row_id"])))
        return scored.to_pandas()

    meta = pd.DataFrame({"row_id": pd.Series(dtype="int64"), "click": pd.Series(dtype="float32"),
                         "conversion": pd.Series(dtype="float32")})
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        frame = dd.read_parquet(str(holey_data / "test.parquet"), dtype_backend="pyarrow")
        result = frame.map_partitions(score_partition, meta=meta).compute()
    local = pa.Table.from_batches(list(score_batches(model, [pq.read_table(holey_data / "test.parquet")], keep=["row_id"])))
    result = result.sort_values("row_id")
    np.testing.assert_array_equal(result["row_id"].to_numpy(), local["row_id"].to_numpy())
    for task in ("click", "conversion"):
        np.testing.assert_allclose(result[task].to_numpy(dtype=np.float32), local[task].to_numpy(), atol=1e-6)
