"""Running on a cluster: cluster.yaml against Ray's own launcher checks, ray_jobs/ (runtime env,
submit helper, README), the node types a run plans with. Jobs on a real autoscaling cluster:
test_localcluster.py.
"""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from boatray import localcluster, nodetypes
from boatray.cluster import free_ports
from boatray.errors import BoatrayError
from boatray.nodetypes import NodeType

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
RUNTIME_ENV = REPO / "ray_jobs" / "runtime_env.yaml"
JOBS_README = REPO / "ray_jobs" / "README.md"


def load_submit():
    """ray_jobs/submit.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("submit", REPO / "ray_jobs" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


submit = load_submit()


# ---------------------------------------------------------------- cluster.yaml

def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def check_with_ray(raw: dict) -> dict:
    """What `ray up` does before it talks to AWS: merge Ray's AWS defaults, then validate
    against ray/autoscaler/ray-schema.json and the launcher's own rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_launcher_checks():
    prepared = check_with_ray(cluster_config())
    assert prepared["provider"]["type"] == "aws"


def test_cluster_layout():
    raw = cluster_config()
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"]["trial_driver"] >= 1
    workers = {name: spec for name, spec in types.items() if name != raw["head_node_type"]}
    assert len(workers) >= 2 and all(spec["min_workers"] == 0 for spec in workers.values())
    assert sum(spec["max_workers"] for spec in workers.values()) >= raw["max_workers"]
    # One bucket: every S3 URI in the file lies under the storage path the jobs write to.
    storage = submit.cluster_overrides(CLUSTER_YAML)[0].removeprefix("storage_path=")
    uris = re.findall(r"s3://[^'\"\s]+", CLUSTER_YAML.read_text())
    assert storage.startswith("s3://") and all(uri.startswith(storage) for uri in uris)


# ---------------------------------------------------------------- ray_jobs/

def test_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load(RUNTIME_ENV.read_text())
    assert set(raw) <= set(RuntimeEnv.known_fields)
    RuntimeEnv(**raw)  # checks the field types (env_vars: str -> str, ...)


def test_submit_builds_the_readme_command():
    args = submit.build_parser().parse_args(
        ["--cluster", str(CLUSTER_YAML), "--config", str(REPO / "ray_jobs" / "lab6.yaml"),
         "--data", "/home/ray/data/mardct", "--set", "sweep.repeats=3"])
    overrides = submit.experiment_overrides(args)
    assert overrides == ["storage_path=s3://YOUR-BUCKET/boatray",
                         "sweep.trial_resource=trial_driver", "sweep.repeats=3"]
    command = submit.submit_command(submit.sweep_arguments(args, overrides), "job-1",
                                    "http://127.0.0.1:8265")
    line = " ".join(command[1:])
    assert line.startswith("job submit --submission-id job-1 --address http://127.0.0.1:8265 ")
    assert line.endswith(
        "--working-dir . --runtime-env ray_jobs/runtime_env.yaml -- python -m boatray.sweep "
        "--config ray_jobs/lab6.yaml --data /home/ray/data/mardct "
        "--set storage_path=s3://YOUR-BUCKET/boatray --set sweep.trial_resource=trial_driver "
        "--set sweep.repeats=3")
    readme = " ".join(JOBS_README.read_text().replace("\\\n", " ").split())
    assert ("--working-dir . --runtime-env ray_jobs/runtime_env.yaml -- python -m "
            "boatray.sweep --config ray_jobs/lab6.yaml") in readme


def test_submit_says_where_results_land_and_how_to_fetch_them():
    from boatray.config import JOB_RESULTS_BASE, load

    def where(*overrides: str) -> str:
        return submit.results_location(load(None, list(overrides), base=JOB_RESULTS_BASE))

    assert where("storage_path=s3://b/p/").startswith(
        "s3://b/p/smoke (fetch: python -m boatray.fetch s3://b/p/smoke smoke)")
    assert where("storage_path=/shared").startswith("/shared/smoke on the node that runs")
    assert where().startswith("~/boatray/results/smoke on the node")
    assert "ray rsync-down cluster.yaml ~/boatray/results/smoke ./smoke" in where()


def test_submit_refuses_bad_input_before_submitting(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(submit.subprocess, "run", lambda *a, **k: pytest.fail("submitted"))
    assert submit.main(["--set", "train.epoch=3"]) == 2
    assert "unknown key 'train.epoch'" in capsys.readouterr().err
    outside = tmp_path / "exp.yaml"
    outside.write_text("name: x\n")
    assert submit.main(["--config", str(outside)]) == 2
    assert "outside" in capsys.readouterr().err
    with pytest.raises(BoatrayError, match=r"metadata\.boatray\.overrides"):
        submit.cluster_overrides(RUNTIME_ENV)


def test_submit_refuses_placeholders_and_an_unreachable_server_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(submit.subprocess, "run", lambda *a, **k: pytest.fail("submitted"))
    assert submit.main(["--cluster", str(CLUSTER_YAML)]) == 2  # its unedited s3://YOUR-BUCKET
    err = capsys.readouterr().err
    assert "storage_path is still the example placeholder" in err and err.count("\n") == 1
    (port,) = free_ports()  # nobody listens there
    assert submit.main(["--set", "storage_path=/shared", "--address",
                        f"http://127.0.0.1:{port}"]) == 2
    captured = capsys.readouterr()
    assert "cannot reach the Ray job server" in captured.err and captured.err.count("\n") == 1
    assert "[submit] logs:" not in captured.out


# ---------------------------------------------------------------- node types

def test_node_types_come_from_the_autoscaler_config():
    local = yaml.safe_load((REPO / "ray_jobs" / "local-cluster.yaml").read_text())
    assert nodetypes.from_config(local) == [NodeType("cpu_2x", {"CPU": 2.0}, 2)]
    # on the head, `ray up` has filled in each type's resources from its instance type
    raw = cluster_config()
    raw["available_node_types"]["gpu_1x"]["resources"] = {"CPU": 8, "GPU": 1}
    raw["available_node_types"]["gpu_4x"]["resources"] = {"CPU": 48, "GPU": 4}
    assert nodetypes.from_config(raw) == [NodeType("gpu_1x", {"CPU": 8.0, "GPU": 1.0}, 8),
                                          NodeType("gpu_4x", {"CPU": 48.0, "GPU": 4.0}, 2)]
    assert "python -m boatray.nodetypes ~/ray_bootstrap_config.yaml" in raw[
        "head_start_ray_commands"]


# ---------------------------------------------------------------- the local cluster's command

def test_the_local_cluster_head_offers_no_cpu_and_the_trial_drivers():
    raw = localcluster.read_config(REPO / "ray_jobs" / "local-cluster.yaml")
    assert localcluster.head_arguments(raw) == [
        "--num-cpus=0", "--num-gpus=0", "--object-store-memory=400000000",
        '--resources={"trial_driver": 4}']
    assert raw["provider"]["module"] == localcluster.PROVIDER


def test_local_cluster_mistakes_are_one_line(tmp_path, capsys):
    aws = tmp_path / "aws.yaml"
    aws.write_text(CLUSTER_YAML.read_text())
    assert localcluster.main(["up", "--config", str(aws), "--dir", str(tmp_path / "c")]) == 2
    assert "provider must be Ray's fake_multinode" in capsys.readouterr().err
    for action in ("status", "kill-node"):
        assert localcluster.main([action, "--dir", str(tmp_path / "none")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no local cluster runs in" in err
