"""`recmtl report RUN_DIR`: PNGs and a self-contained index.html from a run directory."""
from __future__ import annotations

import base64
import json
import re
import struct
import sys
from pathlib import Path

import pytest
from conftest import write_config

from recmtl.config import TrainConfig

pytest.importorskip("matplotlib")


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails unless the bytes are a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def embedded_pngs(page: str) -> dict[str, bytes]:
    """{figure id: PNG bytes} of the images embedded in index.html."""
    found = re.findall(r'<figure id="([^"]+)"><img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return {name: base64.b64decode(b64) for name, b64 in found}


def check_images(out: Path, page: str) -> dict[str, bytes]:
    """Every PNG on disk is embedded byte for byte, with the width/height the <img> tag declares."""
    images = embedded_pngs(page)
    assert sorted(images) == sorted(p.name for p in out.glob("*.png"))
    for name, data in images.items():
        assert (out / name).read_bytes() == data
        w, h = png_size(data)
        assert f'width="{w}" height="{h}"' in page.split(f'<figure id="{name}">')[1].split("</figure>")[0]
    assert "<script" not in page and 'src="http' not in page  # self-contained
    return images


@pytest.mark.slow
def test_report_of_a_real_mmoe_run(tmp_path, funnel_dir, cli):
    data = {"train": str(funnel_dir / "train.parquet"), "validation": str(funnel_dir / "valid.parquet"),
            "test": str(funnel_dir / "test.parquet"), "shuffle_buffer": 4096, "read_rows": 2048}
    cfg = write_config(tmp_path / "c.yaml", funnel_dir, data=data)
    run = tmp_path / "run"
    logging = "log_every" in TrainConfig.model_fields  # the balance log (#6)
    r = cli("train", cfg, "--out", run, "--set", "train.threads=1", "--set", "train.epochs=2",
            *(["--set", "train.log_every=4"] if logging else []))
    assert r.code == 0, r
    r = cli("report", run)
    assert r.code == 0, r
    out = run / "report"
    assert r.out.strip() == f"wrote {out / 'index.html'}"
    page = (out / "index.html").read_text()
    images = check_images(out, page)
    assert {"curves.png", "gate_weights.png", "gate_entropy.png"} <= set(images)
    if logging:  # 2 epochs of 32 steps, every 4th logged
        assert {"balance_weights.png", "balance_grad_norms.png", "balance_cosine.png"} <= set(images)
        assert png_size(images["balance_cosine.png"]) == (800, 400)
        assert "<td>click/conversion</td>" in page and "<td>16</td>" in page
    # curves: 7 panels (loss, auc, logloss, ne, calibration_ratio, ece, brier) in rows of 3, 4 x 3.5 inches at 100 dpi
    assert png_size(images["curves.png"]) == (1200, 1050)
    # reliability diagrams: validation and test of both tasks, one row of 2 panels of 4.2 x 4 inches
    assert png_size(images["reliability.png"]) == (840, 400)
    # gate heatmap: 2 gates x 2 experts
    assert png_size(images["gate_weights.png"]) == (460, 250)

    metrics = json.loads((run / "metrics.json").read_text())
    for task in ("click", "conversion"):
        assert f"<td>{task}</td>" in page
        for split in ("validation", "test"):
            for metric in ("auc", "logloss"):
                assert f"<td>{metrics[split][task][metric]:.4f}</td>" in page
    assert "<td>mmoe (" in page and "num_experts=2" in page and "<td>esmm</td>" in page
    assert f"{metrics['best_epoch']} of 2 trained" in page
    assert "torch" in page and "ctr_task: click" in page  # versions and config
    # nothing is written next to the files but them (atomic writes leave no temporary files)
    assert sorted(p.name for p in out.iterdir()) == sorted([*images, "index.html"])


def synthetic_run(root: Path, *, balance: bool = True, diagnostics: bool = True) -> Path:
    """A hand-written run directory: 3 epochs, cross-stitch style matrices, multi-level gates."""
    root.mkdir()
    history = []
    for e in (1, 2, 3):
        rec = {"epoch": e, "train_loss": {"ctr": 0.6 - 0.05 * e, "watch": 1.5 - 0.2 * e},
               "validation": {"ctr": {"auc": 0.6 + 0.05 * e, "loss": 0.55, "rows": 1000},
                              "watch": {"rmse": 1.2 - 0.1 * e, "mae": 0.9, "loss": 1.4, "rows": 1000}},
               "weights": {"ctr": 1.0, "watch": 0.5}, "rows_per_s": 1000.0 * e, "seconds": 1.0}
        if diagnostics:
            rec["diagnostics"] = {
                "gate_weights": {"level0/ctr": [0.5, 0.3, 0.2], "level0/watch": [0.1, 0.2, 0.7],
                                 "level1/ctr": [0.6, 0.4]},
                "gate_entropy": {"level0/ctr": 1.0 - 0.1 * e, "level0/watch": 0.8, "level1/ctr": 0.6},
                "max_entropy": {"level0/ctr": 1.0986, "level0/watch": 1.0986, "level1/ctr": 0.6931},
                "expert_utilisation": {"level0/ctr": [0.6, 0.3, 0.1], "level0/watch": [0.0, 0.1, 0.9]},
                "matrices": {"cross-stitch 1": {"rows": ["ctr", "watch"], "cols": ["ctr", "watch"],
                                                "values": [[0.9, 0.1], [-0.2, 1.2]]},
                             "task affinity": {"rows": ["a"], "cols": ["x", "y", "z"], "values": [[1, 2, 3]]}},
                "router_temperature": 0.75 + e,
            }
        history.append(rec)
    metrics = {"monitor": "mean/auc", "best_epoch": 2, "validation": history[1]["validation"], "history": history}
    (root / "metrics.json").write_text(json.dumps(metrics))
    (root / "config.yaml").write_text("tower: {name: cross_stitch, units: [8]}\nbalancer: {name: pcgrad}\n"
                                      "tasks:\n- {name: ctr, head: binary, label: click, weight: 1.0}\n"
                                      "- {name: watch, head: regression, label: watch_time, weight: 0.5}\n")
    if balance:
        cos = [0.5, -0.25, 0.1, -0.75]  # mean -0.1, half the steps in conflict
        lines = [json.dumps({"epoch": 1 + i // 2, "step": 10 * (i % 2 + 1), "weights": {"ctr": 1.0, "watch": 0.5},
                             "grad_norms": {"ctr": 0.1 * (i + 1), "watch": 2.0},
                             "cosine": {"ctr/watch": c}}) for i, c in enumerate(cos)]
        (root / "balance.jsonl").write_text("\n".join(lines) + '\n{"epoch": 3, "st')  # last line cut off
    return root


def test_synthetic_run_draws_matrices_gates_and_conflict(tmp_path, cli):
    run = synthetic_run(tmp_path / "run")
    out = tmp_path / "rep"
    r = cli("report", run, "-o", out)
    assert r.code == 0, r
    page = (out / "index.html").read_text()
    images = check_images(out, page)
    assert set(images) == {"curves.png", "gate_weights.png", "gate_entropy.png", "expert_utilisation.png",
                           "matrix_cross-stitch_1.png", "matrix_task_affinity.png", "balance_weights.png",
                           "balance_grad_norms.png", "balance_cosine.png"}
    # curves: loss + auc, rmse, mae -> 2 rows of 3 panels
    assert png_size(images["curves.png"]) == (1200, 700)
    # heatmaps grow with the matrix: 3 gates x 3 experts (ragged levels padded), 1 x 3, 2 x 2
    assert png_size(images["gate_weights.png"]) == (540, 295)
    assert png_size(images["matrix_task_affinity.png"]) == (540, 205)
    assert png_size(images["matrix_cross-stitch_1.png"]) == (460, 250)
    # conflict table, by hand: cosines 0.5, -0.25, 0.1, -0.75 (the truncated last line is skipped)
    row = page.split("<td>ctr/watch</td>")[1].split("</tr>")[0]
    assert re.findall(r"<td>([^<]*)</td>", row) == ["-0.1000", "-0.7500", "-0.7500", "50%", "4"]
    assert "balance.jsonl: 1 unreadable line(s) skipped" in page
    # undrawn diagnostics are listed as JSON (best epoch 2), tasks and components in the summary
    assert "router_temperature" in page and "2.75" in page
    assert "<td>cross_stitch (units=[8])</td>" in page and "<td>pcgrad</td>" in page
    assert "<td>watch</td><td>regression</td><td>watch_time</td>" in page
    assert "<td>0.7000</td>" in page  # validation auc of the best epoch
    assert "Test (best checkpoint)" not in page


def test_balance_steps_per_epoch_counters_and_resumed_runs():
    from recmtl.report import order_balance

    def rec(epoch, step):
        return {"epoch": epoch, "step": step}

    # the trainer's global step: used as it is
    recs = [rec(1, 50), rec(1, 100), rec(2, 150)]
    assert order_balance(recs) == (recs, [50, 100, 150])
    # a counter restarting every epoch: offset by the previous epochs' steps
    recs = [rec(1, 10), rec(1, 20), rec(2, 10), rec(2, 20)]
    assert order_balance(recs) == (recs, [10, 20, 30, 40])
    # killed during epoch 2 after step 250, resumed from the end of epoch 1 (step 200): the re-trained
    # steps' newer lines replace the old ones
    recs = [rec(1, 100), rec(1, 200), rec(2, 250), rec(2, 300), rec(2, 250), rec(2, 300), rec(2, 350)]
    assert order_balance(recs) == ([recs[0], recs[1], *recs[4:]], [100, 200, 250, 300, 350])


def test_sections_without_data_are_left_out(tmp_path, cli):
    run = synthetic_run(tmp_path / "run", balance=False, diagnostics=False)
    for rec_path in [run / "config.yaml"]:
        rec_path.unlink()
    r = cli("report", run)
    assert r.code == 0, r
    page = (run / "report" / "index.html").read_text()
    assert set(check_images(run / "report", page)) == {"curves.png"}
    assert "Tower diagnostics" not in page and "Task balance" not in page and "<h2>Config" not in page


def test_malformed_known_diagnostics_are_listed_not_fatal(tmp_path, cli):
    run = synthetic_run(tmp_path / "run", balance=False)
    m = json.loads((run / "metrics.json").read_text())
    m["history"][1]["diagnostics"]["matrices"] = {"broken": {"values": [[1, 2], [3]]}}
    (run / "metrics.json").write_text(json.dumps(m))
    r = cli("report", run)
    assert r.code == 0, r
    page = (run / "report" / "index.html").read_text()
    assert "matrix_" not in "".join(embedded_pngs(page))
    assert "matrix &#x27;broken&#x27;: rows of different lengths" in page


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a recmtl run directory (it does not exist)"),
    ("file", "is not a recmtl run directory (it is a file, not a folder)"),
    ("empty", "is not a recmtl run directory (no metrics.json"),
    ("corrupt", "metrics.json is not valid JSON"),
    ("no-history", "has no 'history' list"),
])
def test_bad_run_dir_exits_2_with_one_message(tmp_path, cli, case, message):
    run = tmp_path / "run"
    if case == "file":
        run.write_text("x")
    elif case != "missing":
        run.mkdir()
    if case == "corrupt":
        (run / "metrics.json").write_text('{"history": [')
    if case == "no-history":
        (run / "metrics.json").write_text('{"best_epoch": 1}')
    r = cli("report", run)
    assert r.code == 2, r
    assert r.err.startswith("recmtl: error: ") and message in r.err and "Traceback" not in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert not (run / "report").exists()


def test_without_matplotlib_says_what_to_install(tmp_path, cli, monkeypatch):
    run = synthetic_run(tmp_path / "run", balance=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = cli("report", run)
    assert r.code == 2, r
    assert "pip install 'recmtl[report]'" in r.err
    assert not (run / "report").exists()
