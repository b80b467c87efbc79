"""cluster.yaml would boot as written: Ray's own schema, one region, Ray's image pinned to pyproject's
Ray and Python, node types whose GPUs match AWS's instance data, a bootstrap and launches on a mocked
AWS (moto), and setup commands that install into a fresh Python 3.11."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# Ray's image tags read <ray version>-py<major><minor>-<platform>, e.g. 2.60.0-py311-gpu.
RAY_IMAGE = re.compile(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<major>3)(?P<minor>\d+)-gpu")
AWS_REGION_NAME = re.compile(r"\b[a-z]{2}-(?:[a-z]+-)?(?:north|south|east|west|central)[a-z]*-\d(?!\d)")


def _config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _ray_pin() -> SpecifierSet:
    deps = [Requirement(d) for d in _pyproject()["project"]["dependencies"]]
    (ray,) = [d for d in deps if d.name == "ray"]
    return ray.specifier


def _python_floor() -> str:
    """The Python of requires-python's lower bound: ">=3.11" gives "3.11"."""
    (spec,) = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert spec.operator == ">=", "requires-python is expected to be a single lower bound"
    return spec.version


def _images(config: dict) -> list[str]:
    docker = config["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    for node_type in config["available_node_types"].values():
        images += [node_type["docker"]["worker_image"]] if "worker_image" in node_type.get("docker", {}) else []
    return images


def _run_options(config: dict, node_type: str) -> list[str]:
    """The docker run options a node of this type starts its container with (Ray's merge rules)."""
    docker = {**config["docker"], **config["available_node_types"][node_type].get("docker", {})}
    role = "head" if node_type == config["head_node_type"] else "worker"
    return docker.get("run_options", []) + docker.get(f"{role}_run_options", [])


def test_cluster_yaml_matches_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _config()
    validate_config(prepare_config(copy.deepcopy(config)))

    types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    for name, node_type in types.items():
        if name == "head":
            continue
        assert node_type["min_workers"] == 0 and node_type["max_workers"] > 0, name
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != "head") <= config["max_workers"]


def test_schema_check_bites():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _config()
    config["avaliable_node_types"] = {}
    with pytest.raises(jsonschema.ValidationError, match="avaliable_node_types"):
        validate_config(prepare_config(config))


def test_one_region():
    """AMI ids are per region, so every node resolves its AMI at launch (SSM) in provider.region, and
    no zone, ARN or comment names another region."""
    config = _config()
    region = config["provider"]["region"]
    zones = config["provider"]["availability_zone"].split(",")
    assert zones and all(re.fullmatch(rf"{region}[a-z]", z.strip()) for z in zones), zones
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/"), name
    named = set(AWS_REGION_NAME.findall((ROOT / "cluster.yaml").read_text()))
    assert named == {region}, f"cluster.yaml names other regions: {sorted(named - {region})}"


def test_region_check_bites():
    text = "ImageId: ami-0 # us-east-1, arn:aws:ssm:ap-southeast-2::x, us-gov-west-1, zone: eu-west-3b"
    assert AWS_REGION_NAME.findall(text) == ["us-east-1", "ap-southeast-2", "us-gov-west-1", "eu-west-3"]


def test_docker_image_matches_pyproject_pins():
    """Every node runs Ray's image whose Ray satisfies pyproject's pin and whose Python is the one
    requires-python and ruff target: pip then keeps the image's Ray, and no node runs another Python."""
    config = _config()
    pyproject = _pyproject()
    python = _python_floor()
    assert pyproject["tool"]["ruff"]["target-version"] == "py" + python.replace(".", "")
    images = _images(config)
    assert images
    for image in images:
        tag = RAY_IMAGE.fullmatch(image)
        assert tag, f"{image}: expected Ray's own GPU image, rayproject/ray:<ray>-py<python>-gpu"
        assert Version(tag["ray"]) in _ray_pin(), f"{image}: Ray {tag['ray']} outside pyproject's {_ray_pin()}"
        assert f"{tag['major']}.{tag['minor']}" == python, f"{image}: Python is not {python}"


@pytest.fixture
def mocked_aws(monkeypatch):
    """moto's in-process AWS (us-west-2 default VPC: one public subnet per zone), with the
    instance profile cluster.yaml names; Ray's cached boto clients are dropped on both sides."""
    from moto import mock_aws
    from ray.autoscaler._private.aws.utils import client_cache, resource_cache

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    resource_cache.cache_clear()
    client_cache.cache_clear()
    with mock_aws():
        import boto3

        iam = boto3.client("iam", region_name="us-east-1")
        profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in _config()["available_node_types"].values()}
        for name in profiles:
            iam.create_role(RoleName=name, AssumeRolePolicyDocument="{}")
            iam.create_instance_profile(InstanceProfileName=name)
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        yield
    resource_cache.cache_clear()
    client_cache.cache_clear()


def test_node_types_match_instance_gpus(mocked_aws):
    """The declared GPU count of each node type is what AWS reports for its instance type (Ray's own
    detection, on moto's copy of the EC2 instance-type data); a GPU-less head, 1- and 4-GPU workers;
    `--gpus all` exactly where there are GPUs (Docker refuses it on a host without any)."""
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    config = _config()
    declared = {name: t["resources"].get("GPU") for name, t in config["available_node_types"].items()}
    blind = copy.deepcopy(config)
    for node_type in blind["available_node_types"].values():
        node_type["resources"].pop("GPU", None)
    detected = AWSNodeProvider.fillout_available_node_types_resources(blind)["available_node_types"]
    for name, gpus in declared.items():
        assert gpus is not None, f"{name}: declare its GPUs (0 for none)"
        assert detected[name]["resources"].get("GPU", 0) == gpus, name
        has_gpus_flag = "--gpus all" in _run_options(config, name)
        assert has_gpus_flag == (gpus > 0), name

    head = config["head_node_type"]
    assert declared.pop(head) == 0
    assert {1, 4} <= set(declared.values())


def test_bootstraps_and_launches_on_mocked_aws(mocked_aws):
    """Ray's AWS bootstrap (key pair, security group, subnets in the listed zones, instance profile)
    and one launch per node type go through on a mocked EC2."""
    import boto3
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.util import prepare_config

    config = bootstrap_aws(prepare_config(_config()))
    region = config["provider"]["region"]
    ec2 = boto3.client("ec2", region_name=region)
    zones = set(config["provider"]["availability_zone"].split(","))
    assert zones <= {z["ZoneName"] for z in ec2.describe_availability_zones()["AvailabilityZones"]}
    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    for name, node_type in config["available_node_types"].items():
        provider.create_node(node_type["node_config"], {"ray-user-node-type": name}, 1)

    launched = [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
    assert sorted(i["InstanceType"] for i in launched) == sorted(
        t["node_config"]["InstanceType"] for t in config["available_node_types"].values()
    )
    assert {i["Placement"]["AvailabilityZone"] for i in launched} <= zones


# ---------------------------------------------------------------------------------- setup commands


def _project_mount(config: dict) -> str:
    """Where file_mounts puts the repository on a node."""
    (remote,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    return remote


def _pip_args(config: dict, project: Path) -> list[list[str]]:
    """The arguments after `pip` of every setup command, the project's node path replaced by `project`."""
    mount = _project_mount(config)
    commands = []
    for command in config["setup_commands"]:
        argv = shlex.split(command)
        assert argv[:2] == ["pip", "install"], f"setup command {command!r}: only `pip install` is checked here"
        commands.append([str(project) if a == mount else a for a in argv[1:]])
    return commands


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b(torch|torchvision)==([\w.+]+)", text))


def test_setup_commands_pin_what_make_setup_pins():
    config = _config()
    setup = " ".join(config["setup_commands"])
    assert _pins(setup) == _pins((ROOT / "Makefile").read_text()) != {}, "torch pins differ from the Makefile's"
    assert any(args[-2:] == ["-e", "PROJECT"] for args in _pip_args(config, Path("PROJECT"))), (
        f"no setup command installs the project from {_project_mount(config)}"
    )


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}


def _fresh_python311(tmp_path: Path) -> Path:
    """A new Python 3.11 venv with a current pip (as Ray's image has; pip 23 takes ~3x as long to resolve)."""
    base = shutil.which("python3.11")
    if base is None:
        pytest.skip("no python3.11 on PATH")
    try:
        urllib.request.urlopen(urllib.request.Request("https://pypi.org/simple/pip/", method="HEAD"), timeout=10)
    except (urllib.error.URLError, OSError) as err:
        pytest.skip(f"PyPI unreachable: {err}")
    venv = tmp_path / "venv"
    subprocess.run([base, "-m", "venv", str(venv)], check=True, env=_env())
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True, env=_env())
    return python


def _project_copy(tmp_path: Path) -> Path:
    """What setuptools needs to build flashcap, copied: an install writes *.egg-info next to pyproject.toml."""
    project = tmp_path / "flashcap"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, project / name)
    for pattern in _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]:
        for package in ROOT.glob(pattern):
            if (package / "__init__.py").is_file():
                shutil.copytree(package, project / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    return project


def _pip(python: Path, args: list[str], *extra: str) -> None:
    done = subprocess.run([python, "-m", "pip", *args, *extra], capture_output=True, text=True, env=_env())
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_setup_commands_resolve_in_fresh_python311(tmp_path):
    """Each setup command resolves (pip --dry-run: metadata only, nothing installed) in a fresh 3.11."""
    python = _fresh_python311(tmp_path)
    for args in _pip_args(_config(), _project_copy(tmp_path)):
        _pip(python, args, "--dry-run")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_setup_commands_install_in_fresh_python311(tmp_path):
    """The setup commands, run as written in a fresh 3.11, give an environment that imports flashcap
    at the pinned versions."""
    config = _config()
    python = _fresh_python311(tmp_path)
    for args in _pip_args(config, _project_copy(tmp_path)):
        _pip(python, args)
    probe = (
        "import json, sys, torch, torchvision, ray, transformers, flash, pipeline.run, actors\n"
        "print(json.dumps({'python': '%d.%d' % sys.version_info[:2], 'torch': torch.__version__,"
        " 'torchvision': torchvision.__version__, 'ray': ray.__version__, 'flash': flash.__file__}))"
    )
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["python"] == _python_floor()
    pins = _pins(" ".join(config["setup_commands"]))
    assert got["torch"].split("+")[0] == pins["torch"] and got["torchvision"].split("+")[0] == pins["torchvision"]
    assert Version(got["ray"]) in _ray_pin()
    assert Path(got["flash"]).is_relative_to(tmp_path / "flashcap")
