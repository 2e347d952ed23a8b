"""The cluster recipes in examples/cluster/ (Spark ``mapInArrow``, Ray Data ``map_batches``) run in a real local
Spark session (local[2]) and a real local Ray cluster (2 CPUs): a Parquet folder in, a Parquet folder out, scores
equal to ``recmtl score``'s on the same rows, joined on a row id. Missing engines: tests/cluster_engines.py."""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster_engines import engine, java, missing, required
from conftest import REPO
from test_export_score import exported, holey_data  # noqa: F401  (module-scoped fixtures)

from recmtl.errors import DataError

RECIPES = REPO / "examples" / "cluster"
TASKS = ("click", "conversion")


def recipe(name: str) -> ModuleType:
    """examples/cluster/NAME.py, imported as the tests' own module (the file is not part of the package)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(exported) -> Path:  # noqa: F811
    return exported / "model.onnx"


@pytest.fixture(scope="module")
def input_dir(holey_data, tmp_path_factory) -> Path:  # noqa: F811
    """The holey test split (nulls, empty strings, unseen ids; a row_id column) as a folder of two files."""
    folder = tmp_path_factory.mktemp("cluster_in") / "impressions"
    folder.mkdir()
    table = pq.read_table(holey_data / "test.parquet")
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), folder / "part-0.parquet", row_group_size=500)
    pq.write_table(table.slice(half), folder / "part-1.parquet", row_group_size=500)
    return folder


@pytest.fixture(scope="module")
def reference(model, input_dir, tmp_path_factory) -> pa.Table:
    """``recmtl score``'s scores of the same folder."""
    from recmtl.cli import main
    out = tmp_path_factory.mktemp("cluster_ref") / "scores.parquet"
    with pytest.raises(SystemExit) as exit_info:
        main(["score", str(model), str(input_dir), "-o", str(out), "--keep", "row_id", "--no-progress"])
    assert exit_info.value.code in (0, None)
    return pq.read_table(out)


def assert_same_scores(folder: Path, reference: pa.Table) -> None:
    got = pq.read_table(folder)  # every part file of the engine's output folder
    assert got.num_rows == reference.num_rows
    assert got.schema.names == ["row_id", *TASKS]
    got = got.sort_by("row_id")
    np.testing.assert_array_equal(got["row_id"].to_numpy(), np.sort(reference["row_id"].to_numpy()))
    ref = reference.sort_by("row_id")
    for task in TASKS:
        assert got.schema.field(task).type == pa.float32()
        np.testing.assert_allclose(got[task].to_numpy(), ref[task].to_numpy(), rtol=0, atol=1e-6, err_msg=task)


@pytest.fixture(scope="module")
def spark():
    """A local Spark session, 2 cores, no UI; stopped at the end of the module."""
    java()
    engine("pyspark", "spark")
    from pyspark.sql import SparkSession
    old = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = sys.executable  # the executors' Python: this one, with recmtl installed
    session = (SparkSession.builder.master("local[2]").appName("recmtl-test")
               .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
               .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.driver.memory", "1g").config("spark.sql.shuffle.partitions", "2").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    if old is None:
        os.environ.pop("PYSPARK_PYTHON", None)
    else:
        os.environ["PYSPARK_PYTHON"] = old


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster, 2 CPUs, no dashboard, an 80 MB object store; shut down at the end of the module."""
    ray = engine("ray", "ray")
    engine("ray.data", "ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 ** 2, log_to_driver=False,
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_spark_map_in_arrow_scores_equal_recmtl_score(spark, model, input_dir, reference, tmp_path):
    out = tmp_path / "spark_scores"
    recipe("spark_score").score_spark(spark, model, str(input_dir), str(out), keep=["row_id"])
    assert_same_scores(out, reference)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the staging folder is gone


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_spark_recipe_names_a_missing_input_column(spark, model, input_dir, tmp_path):
    folder = tmp_path / "no_c03"
    folder.mkdir()
    pq.write_table(pq.read_table(input_dir).drop_columns(["c03"]), folder / "part-0.parquet")
    with pytest.raises(DataError, match="input column 'c03' is missing"):
        recipe("spark_score").score_spark(spark, model, str(folder), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_spark_ships_two_models_of_one_name(spark, model, tmp_path):
    from pyspark import SparkFiles
    ship = recipe("spark_score").ship
    other = tmp_path / "model.onnx"
    other.write_bytes(b"another model" + model.read_bytes())
    first, again, second = ship(spark, model), ship(spark, model), ship(spark, other)
    assert first == again != second and second.endswith("-model.onnx")
    assert Path(SparkFiles.get(first)).read_bytes() == model.read_bytes()
    assert Path(SparkFiles.get(second)).read_bytes() == other.read_bytes()
    (Path(tempfile.gettempdir()) / "recmtl-spark-models" / second).unlink()  # the test's made-up model


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_ray_map_batches_scores_equal_recmtl_score(ray_cluster, model, input_dir, reference, tmp_path):
    out = tmp_path / "ray_scores"
    recipe("ray_score").score_ray(model, str(input_dir), str(out), keep=["row_id"])
    assert_same_scores(out, reference)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_ray_recipe_names_a_wrong_column_type(ray_cluster, model, input_dir, tmp_path):
    folder = tmp_path / "c03_floats"
    folder.mkdir()
    table = pq.read_table(input_dir)
    table = table.set_column(table.schema.get_field_index("d01"), "d01", pa.array(["x"] * table.num_rows))
    pq.write_table(table, folder / "part-0.parquet")
    with pytest.raises(DataError, match="column 'd01' has type string; the model expects numbers"):
        recipe("ray_score").score_ray(model, str(folder), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["spark_score", "ray_score"])
def test_recipe_cli_one_error_for_missing_model_or_input(name, model, input_dir, tmp_path, capsys):
    """Before any engine starts (these run without Spark or Ray installed)."""
    main = recipe(name).main
    cases = [([str(tmp_path / "nope.onnx"), str(input_dir), str(tmp_path / "o1")], "no such model file"),
             ([str(model), str(tmp_path / "nowhere"), str(tmp_path / "o2")], "no such input file or folder"),
             ([str(model), str(input_dir), str(input_dir)], "already exists")]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{name}: error: ") and message in err and err.count("\n") == 1, err


def test_missing_engine_skips_for_a_developer_and_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("RECMTL_REQUIRE_CLUSTER", raising=False)
    assert not required()
    with pytest.raises(pytest.skip.Exception, match="Java is not installed.*`make test` installs it"):
        missing("Java is not installed")
    with pytest.raises(pytest.skip.Exception, match=r"no_such_engine is not installed.*recmtl\[spark\]"):
        engine("no_such_engine", "spark")
    for env, value in (("CI", "true"), ("RECMTL_REQUIRE_CLUSTER", "1")):
        monkeypatch.setenv(env, value)
        assert required()
        with pytest.raises(pytest.fail.Exception, match="fails instead of skipping"):
            missing("pyspark is not installed")
        monkeypatch.delenv(env)
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("RECMTL_REQUIRE_CLUSTER", "0")
    assert not required()


def test_docs_link_the_recipes_not_copies():
    docs = (REPO / "docs" / "export-and-serving.md").read_text()
    for name in ("spark_score.py", "ray_score.py"):
        assert f"examples/cluster/{name}" in docs
    assert "mapInArrow(lambda" not in docs and "map_batches(lambda" not in docs  # the old untested snippets


def test_recipes_import_only_the_torch_free_scoring_api():
    """An executor installs what ``recmtl score`` needs (the serving image's packages), not torch or pandas."""
    import ast
    for path in RECIPES.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        own = {n for n in names if n.split(".")[0] == "recmtl"}
        assert own <= {"recmtl.errors", "recmtl.serving.score"}, (path.name, own)
        assert not {n.split(".")[0] for n in names} & {"torch", "pandas", "yaml", "pydantic"}, path.name
