"""S3 storage against a real S3-compatible server on localhost: moto's server mode, as Ray's own
storage tests use it (`ray._common.test_utils.simulate_s3_bucket`), one per module.

The endpoint is given the two ways users give it: in the URI (`?endpoint_override=`, the sweep
here: its Ray workers see nothing else) and through `AWS_ENDPOINT_URL` (report, predict,
fetch).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pandas as pd
import pytest
import torch
from pyarrow import fs
from test_sweep import README_JOB, repository_copy, user_env

from boatray import export, models, storage, sweep, weightstore
from boatray.cluster import free_ports
from boatray.finetune import prefix_cache
from boatray.results import Layout

BUCKET = "boatray-ci"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "boatray-ci", "AWS_SECRET_ACCESS_KEY": "boatray-ci",
               "AWS_DEFAULT_REGION": "us-east-1"}
TODAY_BYTES = 544e6
"""What one smoke run wrote to S3 before the weight store (issue 24, measured on main 0c0eec9)."""


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 and a free port, with one bucket; its endpoint and some
    credentials in the environment, as a user sets them. Yields the endpoint."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_ports()[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as env:
            for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
                env.setenv(key, value)
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            yield endpoint
    finally:
        server.stop()


def moto_checks_credentials(endpoint: str, check: bool) -> None:
    """Turn moto's authentication on (unknown keys refused) or off (the default)."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", method="POST",
                                     data=b"0" if check else b"inf",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request).close()


def bucket_bytes(uri: str) -> dict[str, int]:
    """Bytes stored under a URI, per top-level folder or file."""
    filesystem, base = storage.open_location(uri)
    sizes: dict[str, int] = {}
    for info in filesystem.get_file_info(fs.FileSelector(base, recursive=True)):
        if info.type == fs.FileType.File:
            top = info.path[len(base):].strip("/").split("/")[0]
            sizes[top] = sizes.get(top, 0) + info.size
    return sizes


@pytest.mark.parametrize("fault", ["unreachable endpoint", "refused credentials",
                                   "missing bucket"])
def test_unusable_storage_is_one_line_before_any_work(s3, fault, monkeypatch, capsys):
    name = f"refused-{uuid.uuid4().hex[:8]}"
    where = {"unreachable endpoint": f"s3://{BUCKET}/x?endpoint_override=http://127.0.0.1:"
                                     f"{free_ports()[0]}",
             "refused credentials": f"s3://{BUCKET}/x", "missing bucket": "s3://no-bucket/x"}
    expected = {"unreachable endpoint": "the endpoint does not answer",
                "refused credentials": "the credentials are refused",
                "missing bucket": "the bucket does not exist"}
    if fault == "refused credentials":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
        moto_checks_credentials(s3, True)
    try:
        code = sweep.main(["--set", f"storage_path={where[fault]}", "--set", f"name={name}"])
    finally:
        moto_checks_credentials(s3, False)
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: storage s3://") and expected[fault] in errors[0]
    assert not storage.staging_dir(name).exists()  # nothing started


def test_weights_stored_on_s3_load_back_from_the_bucket(s3, tmp_path):
    """The weight store on S3 with the endpoint in the URI; an exported model read from its
    URI with the endpoint from AWS_ENDPOINT_URL."""
    results = f"s3://{BUCKET}/unit-{uuid.uuid4().hex[:8]}/exp"
    torch.manual_seed(0)
    trunk = models.trunk(models.build("resnet18", "none", 3, "avg"), "pool")
    staging = tmp_path / "exp"
    features = staging / "features" / "features.parquet"
    export.save_trunk(trunk, features, weightstore.location(f"{results}?endpoint_override={s3}"))
    weights = staging / "models" / "svm" / export.WEIGHTS
    weightstore.copy(export.trunk_path(features), weights)
    storage.mirror_up(staging, results)
    shutil.rmtree(staging)
    sizes = bucket_bytes(results)
    frozen = sum(t.numel() * t.element_size() for t in trunk.state_dict().values())
    assert sizes[weightstore.STORE_DIR] <= frozen and sizes["models"] < 0.01 * frozen
    model = storage.join(results, "models", "svm")
    local = storage.local_copy(model, tmp_path / "svm")
    weightstore.downloaded(local, model)
    assert json.loads(weightstore.refs_path(local / export.WEIGHTS).read_text())["store"] \
        == weightstore.location(results)  # found from the URI: its results folder's
    state = weightstore.load(local / export.WEIGHTS)
    for name, value in trunk.state_dict().items():
        assert torch.equal(value, state[name]), name


# ---------------------------------------------------------------- the smoke study on S3


@pytest.fixture(scope="module")
def killed_and_resumed(s3, tmp_path_factory) -> dict:
    """The README's main job on S3 from a copy of the repository, SIGKILLed right after its
    first trial finished; its staging folder and that copy deleted; then `--resume` from a
    fresh copy: what the second run had, it found in the bucket."""
    root = tmp_path_factory.mktemp("s3")
    name = f"s3-smoke-{uuid.uuid4().hex[:8]}"
    prefix = f"s3://{BUCKET}/runs"
    # the storage is the point here; the name keeps this run's staging folder to itself
    command = [*README_JOB, "--set", f"storage_path={prefix}?endpoint_override={s3}",
               "--set", f"name={name}"]
    env = {k: v for k, v in user_env().items() if k != "AWS_ENDPOINT_URL"}  # the URI's only
    first = repository_copy(root / "first")
    log_path = root / "first.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=first, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while " done after " not in log_path.read_text():
        assert process.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "no finished trial in 10 minutes"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = re.findall(r"trial \d+/\d+ (\S+) .* done after ", log_path.read_text())
    shutil.rmtree(storage.staging_dir(name))
    shutil.rmtree(first)
    second = repository_copy(root / "second")
    done = subprocess.run([*command, "--resume"], cwd=second, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    yield {"uri": storage.join(f"{prefix}?endpoint_override={s3}", name),
           "plain": f"{prefix}/{name}", "log": done.stdout,
           "finished_before": finished, "staging": storage.staging_dir(name), "root": root}
    shutil.rmtree(storage.staging_dir(name), ignore_errors=True)
    caches = storage.join(prefix, name, Layout.CACHE)
    for key in {relative.parts[0] for _, relative in storage.files_under(caches)}:
        shutil.rmtree(prefix_cache.local_folder(storage.join(caches, key)), ignore_errors=True)


@pytest.mark.slow
def test_a_killed_study_finishes_from_the_bucket_alone(killed_and_resumed, tmp_path):
    run = killed_and_resumed
    assert run["finished_before"]
    for trial, epoch, epochs in re.findall(r"trial \d+/\d+ (\S+) .* epoch (\d+)/(\d+): ",
                                           run["log"]):
        # a trial that had finished trains no epoch again (it may report its last one again)
        assert trial not in run["finished_before"] or epoch == epochs, run["log"][-5000:]
    storage.fetch(run["plain"], tmp_path / "results", ["trials.parquet", "report", "runs"])
    table = pd.read_parquet(tmp_path / "results" / "trials.parquet")
    assert table["trial_id"].nunique() == 4  # the smoke sweep's 2 x 2 grid, each once
    for trial_id, rows in table.groupby("trial_id"):
        assert rows["epoch"].tolist() == list(range(1, len(rows) + 1)), trial_id
    assert (tmp_path / "results" / "report" / "report.html").is_file()
    assert {"svm", "probe", "baseline-bettercnn-r0"} <= {
        p.name for p in (tmp_path / "results" / "runs").iterdir()}


@pytest.mark.slow
def test_the_smoke_study_stores_under_a_third_of_what_it_did(killed_and_resumed):
    sizes = bucket_bytes(killed_and_resumed["plain"])
    print(f"bucket: {sum(sizes.values()) / 1e6:.1f} MB, " + ", ".join(
        f"{k} {v / 1e6:.1f}" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])))
    assert sum(sizes.values()) <= TODAY_BYTES / 3
    trunk = sum(t.numel() * t.element_size() for t in models.trunk(
        models.build("resnet18", "none", 4, "avg"), "pool").state_dict().values())
    assert sizes[weightstore.STORE_DIR] <= 1.01 * trunk  # the frozen trunk, once


@pytest.mark.slow
def test_the_closing_lines_work_from_another_machine(killed_and_resumed, tmp_path):
    """The printed commands, run elsewhere (another folder, no staging folder): the predict
    line reads the model from the bucket, the fetch line downloads results that predict and
    open by themselves; `python -m boatray.report` re-renders the report in the bucket."""
    run = killed_and_resumed
    lines = dict(line.split(": ", 1) for line in run["log"].splitlines()
                 if line.startswith("[boatray] ") and ": " in line)
    assert lines["[boatray] report"].startswith(storage.join(run["uri"], "report", "report.html"))
    predict = shlex.split(lines["[boatray] predict with it"])
    assert predict[predict.index("--model") + 1].startswith(run["uri"].split("?")[0])
    images = tmp_path / "images"
    shutil.copytree(run["staging"] / "data" / "synthetic" / "test", images)
    shutil.rmtree(run["staging"])
    predict[predict.index("--images") + 1] = str(images)
    elsewhere = {k: v for k, v in user_env().items() if k != "AWS_ENDPOINT_URL"}
    done = subprocess.run([sys.executable, *predict[1:]], cwd=tmp_path, env=elsewhere,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(pd.read_csv(tmp_path / "predictions.csv")) == len(list(images.rglob("*.jpg")))

    fetch = shlex.split(lines["[boatray] fetch the results"])
    done = subprocess.run([sys.executable, *fetch[1:]], cwd=tmp_path, env=elsewhere,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fetched = tmp_path / fetch[-1]
    model = Layout(fetched).models / storage.name(predict[predict.index("--model") + 1])
    refs = weightstore.refs_path(model / export.WEIGHTS)
    if refs.is_file():  # the frozen tensors it names came down with it
        for ref in json.loads(refs.read_text())["tensors"].values():
            assert (fetched / weightstore.STORE_DIR / ref["sha256"]).is_file()
    done = subprocess.run([sys.executable, "-m", "boatray.predict", "--model", str(model),
                           "--images", str(images), "--out", "local.csv"], cwd=tmp_path,
                          env=elsewhere, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "local.csv"),
                                  pd.read_csv(tmp_path / "predictions.csv"))

    report = storage.join(run["plain"], "report", "report.html")
    before = storage.read_bytes(report)
    done = subprocess.run([sys.executable, "-m", "boatray.report", run["plain"], "--seed", "1"],
                          cwd=tmp_path, env=user_env(), capture_output=True, text=True,
                          timeout=300)  # another bootstrap seed: a report that differs
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"report: {report}") and storage.read_bytes(report) != before
