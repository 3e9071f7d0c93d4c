"""The smoke sweep's wall time: `python -m boatray.sweep` (the built-in smoke experiment)
against a plain PyTorch script doing the same work sequentially in one process.

    python benchmarks/smoke_sweep.py [--keep]

boatray: `python -m boatray.sweep --set storage_path=<tmp>` in a subprocess with
RAY_ADDRESS=local (a fresh local Ray instance), timed from launch to exit; its own stage lines
show where the time goes.

plain: one fresh Python process, the smoke experiment's settings (boatray's preset, read
with `boatray.config.load`) and the images and splits of the manifest the sweep made:

- the fine-tuning trials (freeze x lr grid; resnet18, random init, at the smoke image size,
  its batch size, Adam, fp32, eager), each trained for as many epochs as the sweep's ASHA let
  it run (trials.parquet), validated after every epoch;
- valid and test predictions of the best trial per freeze spec (by valid macro F1);
- features of every image (the resnet18 trunk, the features batch size), then
  StandardScaler + SVC(kernel="rbf") over the C grid selected on valid and refitted on
  train+valid, and the logistic-regression probe the same way;
- BetterCNN from scratch at the baseline's size, epochs, batch size and lr;
- scikit-learn's classification_report of every approach on the test split.

It leaves out what the sweep does besides: Ray's start-up, generating the images, the SVM's
calibrated probabilities, checkpoints, run folders, bootstrap confidence intervals, plots and
report.md/html. The last line, `overhead ratio: X`, is boatray's wall time over the plain
script's, both measured in this run; the table gives each stage's share of boatray's time and
its own ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import classification_report, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from torch import nn

from boatray import approaches, config, estimate
from boatray.data.manifest import read_manifest
from boatray.models import BetterCNN
from boatray.sweep import FEATURES_STAGE
from common import (
    PeakMemory,
    isolated,
    lab_loader,
    lab_optimizer,
    lab_predict,
    lab_resnet,
    lab_train_epoch,
    print_footer,
    print_header,
    print_table,
    ratio,
)

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true",
                        help="keep the sweep's results folder (printed) instead of deleting it")
    return parser


def run_sweep(storage: Path, log: Path) -> tuple[int, float, PeakMemory]:
    """`python -m boatray.sweep --set storage_path=...` (RAY_ADDRESS=local): exit code, wall
    seconds, peak memory of its process tree."""
    env = {**os.environ, "RAY_ADDRESS": "local"}
    command = [sys.executable, "-m", "boatray.sweep", "--set", f"storage_path={storage}"]
    with log.open("w") as out, PeakMemory(include_self=False) as memory:
        started = time.perf_counter()
        code = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                              check=False).returncode
        seconds = time.perf_counter() - started
    return code, seconds, memory


def trial_epochs(results: Path) -> dict[tuple[str, float], int]:
    """(freeze, lr) -> epochs each sweep trial ran (ASHA may stop some early)."""
    table = pd.read_parquet(results / "trials.parquet")
    ran = table.groupby(["freeze", "lr"])["epoch"].max()
    return {(freeze, float(lr)): int(epochs) for (freeze, lr), epochs in ran.items()}


def plain_pipeline(manifest: Path, epochs: dict[tuple[str, float], int]) -> dict[str, float]:
    """The same work in plain PyTorch and scikit-learn, one process: seconds per stage."""
    exp = config.load()
    frame, classes = read_manifest(manifest)
    rows = {split: frame[frame.split == split] for split in ("train", "valid", "test")}

    def loader(split: str, size, batch: int, shuffle: bool = False):
        return lab_loader(rows[split].path, rows[split].label_idx, size, shuffle, batch)

    seconds, reports = {}, {}
    started = time.perf_counter()
    size, batch = exp.data.image_size, exp.train.batch_size
    best: dict[str, tuple[float, nn.Module]] = {}
    for (freeze, lr), count in epochs.items():
        torch.manual_seed(exp.seed)
        model = lab_resnet(exp.model.name, len(classes), freeze)
        optimizer = lab_optimizer(model, lr)
        for _ in range(count):
            lab_train_epoch(model, loader("train", size, batch, True), optimizer, CPU)
            logits, labels = lab_predict(model, loader("valid", size, batch), CPU)
        score = f1_score(labels, logits.argmax(1), average="macro", zero_division=0)
        if freeze not in best or score > best[freeze][0]:
            best[freeze] = (score, model)
    for freeze, (_, model) in best.items():
        lab_predict(model, loader("valid", size, batch), CPU)
        logits, labels = lab_predict(model, loader("test", size, batch), CPU)
        reports[f"finetune {freeze}"] = (labels, logits.argmax(1))
    seconds[approaches.get("finetune").stage] = time.perf_counter() - started

    started = time.perf_counter()
    trunk = nn.Sequential(*list(lab_resnet(exp.model.name, len(classes)).children())[:-1])
    x, y = {}, {}
    for split in rows:
        pooled, labels = lab_predict(trunk, loader(split, size, exp.features.batch_size), CPU)
        x[split], y[split] = pooled.flatten(1).numpy(), labels.numpy()
    seconds[FEATURES_STAGE] = time.perf_counter() - started
    heads = {"svm": [make_pipeline(StandardScaler(), SVC(kernel="rbf", C=c, gamma=g))
                     for c in exp.svm.C for g in exp.svm.gamma],
             "probe": [make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
                       for c in exp.probe.C]}
    for head, grid in heads.items():
        started = time.perf_counter()
        scores = [f1_score(y["valid"], m.fit(x["train"], y["train"]).predict(x["valid"]),
                           average="macro", zero_division=0) for m in grid]
        chosen = grid[scores.index(max(scores))]
        chosen.fit(x["train"], y["train"]).predict(x["valid"])
        chosen.fit(np.concatenate([x["train"], x["valid"]]),
                   np.concatenate([y["train"], y["valid"]]))
        reports[head] = (y["test"], chosen.predict(x["test"]))
        seconds[approaches.get(head).stage] = time.perf_counter() - started

    started = time.perf_counter()
    base = exp.baseline
    torch.manual_seed(exp.seed)
    model = BetterCNN(len(classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=base.lr)
    for _ in range(base.epochs):
        lab_train_epoch(model, loader("train", base.image_size, base.batch_size, True),
                        optimizer, CPU)
        lab_predict(model, loader("valid", base.image_size, base.batch_size), CPU)
    logits, labels = lab_predict(model, loader("test", base.image_size, base.batch_size), CPU)
    reports["baseline"] = (labels, logits.argmax(1))
    seconds[approaches.get("baseline").stage] = time.perf_counter() - started

    started = time.perf_counter()
    for truth, predicted in reports.values():
        classification_report(truth, predicted, output_dict=True, zero_division=0)
    seconds["report"] = time.perf_counter() - started
    return seconds


def main() -> None:
    args = build_parser().parse_args()
    print_header("the smoke sweep (built-in smoke experiment) against plain PyTorch")
    work = Path(tempfile.mkdtemp(prefix="boatray-bench-smoke-"))
    exp = config.load()
    results = work / exp.name
    log = work / "sweep.log"
    code, sweep_seconds, sweep_memory = run_sweep(work, log)
    output = log.read_text()
    if code != 0:
        print(output[-4000:])
        sys.exit(f"error: the smoke sweep failed (exit code {code}); log: {log}")
    # each stage's wall seconds as the run measured them (its start, the stages, the report)
    stages = json.loads((results / estimate.TIMING_FILE).read_text())["actual"]
    epochs = trial_epochs(results)
    print(f"sweep   : {len(epochs)} trials, epochs run {sorted(epochs.items())}; log {log}",
          flush=True)

    started = time.perf_counter()
    plain, plain_memory = isolated(plain_pipeline, results / "data" / "manifest.parquet", epochs)
    plain_seconds = time.perf_counter() - started

    rows = [{"stage": title, "boatray s": stages.get(title), "plain s": plain.get(title)}
            for title in dict.fromkeys([*stages, *plain])]
    rows.append({"stage": "rest (interpreter, imports, Ray's end)",
                 "boatray s": sweep_seconds - sum(stages.values()),
                 "plain s": plain_seconds - sum(plain.values())})
    for row in rows:
        row["boatray share"] = (f"{row['boatray s'] / sweep_seconds:.0%}"
                                if row["boatray s"] is not None else None)
        row["boatray / plain"] = (ratio(row["boatray s"], row["plain s"])
                                  if row["boatray s"] is not None and row["plain s"] else None)
    rows.append({"stage": "TOTAL wall", "boatray s": sweep_seconds, "plain s": plain_seconds,
                 "boatray / plain": ratio(sweep_seconds, plain_seconds)})
    print_table(rows)
    print_table([{"path": "boatray sweep (all its processes)", **sweep_memory.columns()},
                 {"path": "plain script (one process)", **plain_memory}])
    if args.keep:
        print(f"results : {results}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print_footer()
    print(f"overhead ratio: {ratio(sweep_seconds, plain_seconds):.2f}", flush=True)


if __name__ == "__main__":
    main()
