"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema) with the node types we document."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))

    types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    gpu = types["gpu_captioner"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] > 0
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert types["cpu_decoder"]["min_workers"] == 0
    setup = " ".join(config["setup_commands"])
    assert "torch==2.14.1" in setup and "pip install -q -e /home/ubuntu/flashcap" in setup


def test_schema_check_bites():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["avaliable_node_types"] = {}
    with pytest.raises(jsonschema.ValidationError, match="avaliable_node_types"):
        validate_config(prepare_config(config))
