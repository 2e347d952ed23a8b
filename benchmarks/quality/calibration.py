"""Calibration on the funnel generator (true probabilities known), through the command line (issue 19).

Per seed: ``recmtl datagen funnel``; train an MMoE/ESMM run; ECE, calibration ratio, NE and AUC on the test split
of the raw model and of each calibrator (``recmtl calibrate --data valid --test test``), against the true
probabilities' own figures; train again on the training split with the non-clicks kept at ``--rate``
(``tasks[].negative_sampling_rate``) and report click's calibration ratio on the full-rate test split with and
without the correction; export the calibrated models and check that ``recmtl score`` and ``recmtl serve`` return
``evaluate``'s calibrated scores; scoring rows/s of the exported model without and with each calibrator.

Usage: python benchmarks/quality/calibration.py [--seeds 1,2,3] [--rows 300000] [--work-dir DIR] [--json OUT]
       [--tag T --epochs N --lr LR --patience P --batch-size B --monitor M] [--no-calibration] [--no-downsampling]
       [--no-speed]
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from recmtl import metrics as M

METHODS = ("isotonic", "platt", "temperature")
TASKS = ("click", "conversion")


def recmtl(*args: object, capture: bool = False) -> str:
    cmd = [str(Path(sys.executable).with_name("recmtl")), *map(str, args)]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else sys.stderr)
    return done.stdout if capture else ""


#: the training settings (``--epochs``, ``--lr``, ``--patience``, ``--batch-size``, ``--monitor`` override them) and the
#: weights scored (``--checkpoint``)
TRAIN = {"epochs": 3, "lr": 0.003, "patience": 1, "checkpoint": "tasks", "batch_size": 1024, "monitor": "auto"}


def write_config(path: Path, data: Path, train: Path, rate: float = 1.0) -> None:
    cats = ["user_id", "item_id", *(f"c{i:02d}" for i in range(3, 9))]
    cfg = {
        "seed": 1,
        "data": {"train": str(train), "validation": str(data / "valid.parquet"), "shuffle_buffer": 65536,
                 "read_rows": 8192},
        "features": [{"name": n, "kind": "categorical"} for n in cats]
        + [{"name": f"d{i:02d}", "kind": "dense"} for i in range(1, 7)],
        "tasks": [{"name": "click", "head": "binary", **({"negative_sampling_rate": rate} if rate != 1 else {})},
                  {"name": "conversion", "head": "esmm", "params": {"ctr_task": "click"}}],
        "encoders": {"categorical": {"name": "embedding", "dim": 16}},
        "tower": {"name": "mmoe", "num_experts": 4, "expert_units": [64], "task_units": [32]},
        "optimizer": {"lr": TRAIN["lr"]},
        "train": {"batch_size": TRAIN["batch_size"], "epochs": TRAIN["epochs"], "progress": False, "threads": 1,
                  "early_stopping": {"patience": TRAIN["patience"], "monitor": TRAIN["monitor"]}},
    }
    path.write_text(yaml.safe_dump(cfg))


def evaluate_scores(run: Path, test: Path, out: Path, calibrated: bool) -> pa.Table:
    recmtl("evaluate", run, test, "--save-predictions", out, "--checkpoint", TRAIN["checkpoint"],
           *([] if calibrated else ["--no-calibration"]))
    return pq.read_table(out)


def figures(label: np.ndarray, score: np.ndarray) -> dict[str, float]:
    m = M.binary_metrics(label, score)
    return {k: m[k] for k in ("auc", "ne", "calibration_ratio", "ece", "brier")} | {"distinct": int(np.unique(score).size)}


def score_rate(model: Path, data: Path, out: Path, repeats: int = 3) -> float:
    from recmtl.serving.score import score_parquet
    best = float("inf")
    rows = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        rows = score_parquet(model, str(data), out, [], 1024, 1, 1, progress=False)
        best = min(best, time.perf_counter() - t0)
    return rows / best


def serve_scores(model: Path, rows: list[dict]) -> dict[str, np.ndarray]:
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("recmtl")), "serve", str(model), "--port", str(port),
                             "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        preds = []
        for start in range(0, len(rows), 1000):
            r = httpx.post(url + f"/v1/models/{model.stem}/predict", json={"instances": rows[start:start + 1000]},
                           timeout=60)
            r.raise_for_status()
            preds += r.json()["predictions"]
        return {k: np.array([p[k] for p in preds], np.float64) for k in preds[0]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def one_seed(seed: int, rows: int, rate: float, work: Path, tag: str = "", main_part: bool = True,
             downsampling: bool = True, speed: bool = True) -> dict:
    data = work / f"data{seed}"
    if not (data / "test.parquet").exists():
        recmtl("datagen", "funnel", data, "--rows", rows, "--seed", seed, "--categorical", 8, "--dense", 6,
               "--cardinality", 500, "--valid-fraction", 0.1, "--test-fraction", 0.3)
    test = data / "test.parquet"
    truth = pq.read_table(data / "test.truth.parquet")
    labels = pq.read_table(test, columns=list(TASKS))
    out: dict = {"seed": seed, "truth": {}, "raw": {}, "calibrated": {}, "train": dict(TRAIN)}
    for t in TASKS:
        out["truth"][t] = figures(labels[t].to_numpy().astype(float), truth[t].to_numpy().astype(float))
    if main_part:
        calibration_part(seed, data, work, tag, labels, speed, out)
    if downsampling:
        downsampling_part(seed, data, work, tag, labels, rate, out)
    return out


def calibration_part(seed: int, data: Path, work: Path, tag: str, labels: pa.Table, speed: bool, out: dict) -> None:
    test, valid = data / "test.parquet", data / "valid.parquet"
    run = work / f"run{seed}{tag}"
    if not (run / "metrics.json").exists():
        write_config(work / f"cfg{seed}{tag}.yaml", data, data / "train.parquet")
        t0 = time.perf_counter()
        recmtl("train", work / f"cfg{seed}{tag}.yaml", "--out", run)
        out["train_seconds"] = round(time.perf_counter() - t0, 1)
    (run / "calibrator.json").unlink(missing_ok=True)
    raw = evaluate_scores(run, test, work / "raw.parquet", calibrated=False)
    for t in TASKS:
        out["raw"][t] = figures(labels[t].to_numpy().astype(float), raw[t].to_numpy().astype(float))
    models = {}
    recmtl("export", run, "-o", work / f"raw{seed}.onnx", "--sample", valid, "--checkpoint", TRAIN["checkpoint"])
    models["none"] = work / f"raw{seed}.onnx"
    for method in METHODS:
        recmtl("calibrate", run, "--data", valid, "--method", method, "--checkpoint", TRAIN["checkpoint"])
        cal = evaluate_scores(run, test, work / f"{method}.parquet", calibrated=True)
        out["calibrated"][method] = {t: figures(labels[t].to_numpy().astype(float), cal[t].to_numpy().astype(float))
                                     for t in TASKS}
        model = work / f"{method}{seed}.onnx"
        recmtl("export", run, "-o", model, "--sample", valid, "--fuse", "click^1.0 * conversion^0.5",
               "--checkpoint", TRAIN["checkpoint"])
        models[method] = model
        recmtl("score", model, test, "-o", work / "scored.parquet", "--no-progress")
        scored = pq.read_table(work / "scored.parquet")
        diff = {t: np.abs(scored[t].to_numpy().astype(np.float64) - cal[t].to_numpy()) for t in TASKS}
        entry = {t: {"max_abs": float(d.max()), "share_over_1e-6": float((d > 1e-6).mean())} for t, d in diff.items()}
        if seed == 1 and speed:  # serve: the first 5000 test rows over /v1
            feats = [c for c in pq.read_schema(test).names if c not in TASKS]
            inst = pq.read_table(test, columns=feats).slice(0, 5000).to_pylist()
            served = serve_scores(model, inst)
            entry["serve"] = {t: float(np.abs(served[t] - cal[t].to_numpy()[:5000]).max()) for t in TASKS}
        out["calibrated"][method]["score_vs_evaluate"] = entry
    (run / "calibrator.json").unlink(missing_ok=True)
    if speed:
        out["rows_per_s"] = {k: round(score_rate(m, test, work / "rate.parquet")) for k, m in models.items()}


def downsampling_part(seed: int, data: Path, work: Path, tag: str, labels: pa.Table, rate: float, out: dict) -> None:
    """Non-clicks of the training split kept at ``rate``; click's scores with and without the correction."""
    test = data / "test.parquet"
    sampled = data / f"train_neg{rate:g}.parquet"
    if not sampled.exists():
        tab = pq.read_table(data / "train.parquet")
        keep = np.random.default_rng(seed).random(tab.num_rows) < rate
        keep |= tab["click"].to_numpy() == 1
        pq.write_table(tab.filter(pa.array(keep)), sampled)
    ds_run = work / f"run{seed}{tag}_neg"
    if not (ds_run / "metrics.json").exists():
        write_config(work / f"cfg{seed}{tag}_neg.yaml", data, sampled, rate)
        recmtl("train", work / f"cfg{seed}{tag}_neg.yaml", "--out", ds_run)
    corrected = evaluate_scores(ds_run, test, work / "ds.parquet", calibrated=False)
    y = labels["click"].to_numpy().astype(float)
    p = corrected["click"].to_numpy().astype(np.float64)
    uncorrected = p / (rate + p * (1 - rate))  # the inverse of the correction: the network's own output
    keep = (np.random.default_rng(seed + 100).random(len(y)) < rate) | (y == 1)  # the test split sampled as training was
    history = json.loads((ds_run / "metrics.json").read_text())
    out["downsampling"] = {"rate": rate, "train_rows": pq.read_metadata(sampled).num_rows,
                           "corrected": figures(y, p), "uncorrected": figures(y, uncorrected),
                           "uncorrected_on_sampled_test_ratio": M.calibration_ratio(y[keep], uncorrected[keep]),
                           "epochs_run": len(history["history"]),
                           "click_epoch": (history.get("task_best") or {}).get("click", {}).get("epoch")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--rate", type=float, default=0.1, help="fraction of non-clicks kept in the downsampled run")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--tag", default="", help="suffix of the run folders (another training setting, same data)")
    ap.add_argument("--epochs", type=int, default=TRAIN["epochs"])
    ap.add_argument("--lr", type=float, default=TRAIN["lr"])
    ap.add_argument("--patience", type=int, default=TRAIN["patience"], help="early-stopping patience (0: never stop)")
    ap.add_argument("--checkpoint", default=TRAIN["checkpoint"], help="the weights scored: tasks, best or last")
    ap.add_argument("--batch-size", type=int, default=TRAIN["batch_size"])
    ap.add_argument("--monitor", default=TRAIN["monitor"], help="early_stopping.monitor, e.g. click/logloss")
    ap.add_argument("--no-calibration", dest="main_part", action="store_false", help="skip the calibrators")
    ap.add_argument("--no-downsampling", dest="downsampling", action="store_false", help="skip the downsampled run")
    ap.add_argument("--no-speed", dest="speed", action="store_false", help="skip rows/s and serve")
    args = ap.parse_args(argv)
    TRAIN.update(epochs=args.epochs, lr=args.lr, patience=args.patience, checkpoint=args.checkpoint,
                 batch_size=args.batch_size, monitor=args.monitor)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="recmtl-calib-"))
    work.mkdir(parents=True, exist_ok=True)
    results = [one_seed(int(s), args.rows, args.rate, work, args.tag, args.main_part, args.downsampling, args.speed)
               for s in args.seeds.split(",")]
    text = json.dumps(results, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
