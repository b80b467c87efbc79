"""Configuration: YAML + flags, every bad value a clear error before any cluster work."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.config import CaptionConfig, load_config


@pytest.fixture
def dirs(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "model").mkdir()
    return {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "model": str(tmp_path / "model")}


def test_yaml_and_flags(tmp_path, dirs):
    path = tmp_path / "job.yaml"
    path.write_text(f"input: {dirs['input']}\noutput: s3://bucket/captions/\nmodel: {dirs['model']}\nbatch_size: 8\n")
    config = load_config(str(path), batch_size=2, max_new_tokens=None)
    assert config.batch_size == 2 and config.output == "s3://bucket/captions/" and config.max_new_tokens == 512


def test_false_and_zero_overrides_are_kept(tmp_path, dirs):
    """Only None means "not given": `--no-report` and `--gpus-per-actor 0` must beat the YAML file."""
    path = tmp_path / "job.yaml"
    path.write_text("report: true\nadaptive_block: true\ngpus_per_actor: 1\n")
    config = load_config(str(path), **dirs, report=False, adaptive_block=False, gpus_per_actor=0.0)
    assert (config.report, config.adaptive_block, config.gpus_per_actor) == (False, False, 0.0)


def test_config_is_frozen(dirs):
    config = load_config(**dirs)
    with pytest.raises(ValidationError, match="frozen"):
        config.batch_size = 3


def test_every_field_is_documented():
    assert all(f.description for f in CaptionConfig.model_fields.values())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"input": "gs://bucket/x"}, "only s3:// URIs"),
        ({"input": "/does/not/exist"}, "is not a directory"),
        ({"model": "/no/model"}, "model '/no/model' is not a directory"),
        ({"batch_size": 0}, "batch_size"),
        ({"temperature": -1}, "temperature"),
        ({"min_actors": 3, "max_actors": 2}, "max_actors"),
        ({"s3_endpoint": "localhost:9000"}, "http:// or https://"),
        ({"dtype": "int8"}, "dtype"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_bad_values_are_clear_errors(dirs, change, message):
    with pytest.raises(ValueError, match=message):
        load_config(**{**dirs, **change})


def test_missing_config_file():
    with pytest.raises(ValueError, match="does not exist"):
        load_config("/no/such.yaml")


def test_local_checkpoints_become_absolute_paths(tmp_path, dirs, monkeypatch):
    """A relative --model or --drafter names a folder from where the job was started; Ray Train
    runs its workers in another directory, where the same words would name a Hub id."""
    (tmp_path / "drafter").mkdir()
    monkeypatch.chdir(tmp_path)
    config = load_config(**{**dirs, "model": "model", "drafter": "./drafter"})
    assert (config.model, config.drafter) == (str(tmp_path / "model"), str(tmp_path / "drafter"))
    hub = load_config(**{**dirs, "model": "Qwen/Qwen2.5-VL-7B-Instruct", "drafter": "s3://bucket/drafter/"})
    assert (hub.model, hub.drafter) == ("Qwen/Qwen2.5-VL-7B-Instruct", "s3://bucket/drafter/")


def test_suffix_needs_a_flash_drafter_and_suffix_is_a_reserved_drafter():
    base = {"input": ".", "output": "/tmp/x", "model": "models/demo-target"}
    assert load_config(**base, drafter="suffix").drafter == "suffix"
    for drafter in (None, "suffix"):
        with pytest.raises(ValueError, match="suffix adds suffix proposals to a FLASH drafter"):
            load_config(**base, drafter=drafter, suffix=True)
    assert load_config(**base, drafter="models/demo-drafter", suffix=True).suffix
