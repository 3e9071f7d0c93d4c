"""Remote storage_path: the staging folder mirrored up and down (file:// stands in for S3)."""

from __future__ import annotations

import shutil
from pathlib import Path

from boatray import config, storage


def test_remote_storage_mirrors_results_but_not_images_or_ray_state(tmp_path):
    exp = config.load(None, [f"storage_path=file://{tmp_path}/bucket", "name=mirror-test"])
    assert exp.remote_storage and exp.storage_uri == f"file://{tmp_path}/bucket/mirror-test"
    staging = exp.results_dir
    shutil.rmtree(staging, ignore_errors=True)
    for relative, text in [("experiment.json", "{}"), ("runs/svm/run.json", "{}"),
                           ("data/manifest.parquet", "m"), ("data/synthetic/train/a.jpg", "i")]:
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        (staging / relative).write_text(text)
    storage.mirror_up(exp.results_dir, exp.storage_uri)
    remote = tmp_path / "bucket" / "mirror-test"
    (remote / "tune").mkdir()
    (remote / "tune" / "experiment_state.json").write_text("ray's")
    assert sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()) == [
        "data/manifest.parquet", "experiment.json", "runs/svm/run.json",
        "tune/experiment_state.json"]
    shutil.rmtree(staging)
    storage.mirror_down(exp.results_dir, exp.storage_uri)
    assert sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()) == [
        "data/manifest.parquet", "experiment.json", "runs/svm/run.json"]
    shutil.rmtree(staging)


def test_local_storage_is_left_alone(tmp_path):
    exp = config.load(None, [f"storage_path={tmp_path}"])
    assert not exp.remote_storage
    assert exp.results_dir == Path(tmp_path) / "smoke"
    assert exp.storage_uri == str((Path(tmp_path) / "smoke").resolve())
    storage.mirror_up(exp.results_dir, exp.storage_uri)
    storage.mirror_down(exp.results_dir, exp.storage_uri)
    assert not exp.results_dir.exists()


def test_locations_keep_a_uris_query_at_the_end():
    uri = "s3://bucket/prefix?endpoint_override=http://127.0.0.1:9000&region=us-east-1"
    query = "?endpoint_override=http://127.0.0.1:9000&region=us-east-1"
    assert storage.join(uri, "smoke", "tune/") == f"s3://bucket/prefix/smoke/tune{query}"
    assert storage.parent(storage.join(uri, "smoke")) == uri
    assert storage.name(storage.join(uri, "smoke")) == "smoke"
    assert storage.same_kind(uri, "bucket/prefix/x") == f"s3://bucket/prefix/x{query}"
    assert storage.endpoint(uri) == "http://127.0.0.1:9000"
    assert storage.join("/results", "smoke") == "/results/smoke"
    assert storage.parent("/results/smoke") == "/results"
    assert storage.endpoint("/results") is None
    exp = config.load(None, [f"storage_path={uri}"])
    assert exp.storage_uri == f"s3://bucket/prefix/smoke{query}"


def test_the_weight_store_and_ray_state_stay_remote_and_fetch_skips_only_ray_state(tmp_path):
    remote = tmp_path / "bucket" / "exp"
    for relative in ("report/report.html", "models/svm/weights.pt", "tensors/ab12",
                     "tune/experiment_state.json", "cache/key/cache.json", "data/manifest.parquet",
                     "data/synthetic/test/a.jpg"):
        (remote / relative).parent.mkdir(parents=True, exist_ok=True)
        (remote / relative).write_text("x")
    staging, fetched = tmp_path / "staging", tmp_path / "fetched"
    storage.mirror_down(staging, f"file://{remote}")
    assert sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()) \
        == ["data/manifest.parquet", "models/svm/weights.pt", "report/report.html"]
    assert storage.fetch(f"file://{remote}", fetched) == 4
    assert (fetched / "tensors" / "ab12").is_file() and not (fetched / "tune").exists()


def test_the_staging_folder_is_not_an_importable_name():
    """`python -m boatray.sweep` run from the temporary folder imported a staging folder named
    `boatray` there as the package, and stopped: unknown preset 'smoke'."""
    assert not storage.staging_dir("smoke").parent.name.isidentifier()
