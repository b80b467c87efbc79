"""The job's entry point: one flag per CaptionConfig field over the YAML file, and the embedded
default, which captions the sample videos and checks them against their true captions."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.caption_videos import build_config, build_parser, main, parse_args
from pipeline.config import CaptionConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def dirs(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "model").mkdir()
    return ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(tmp_path / "model")]


def test_every_config_field_has_a_flag():
    flags = {a.dest: a.option_strings for a in build_parser()._actions}
    for name in CaptionConfig.model_fields:
        assert "--" + name.replace("_", "-") in flags.get(name, []), name


def test_flags_reach_the_config(dirs):
    argv = [*dirs, "--max-side", "224", "--dtype", "bfloat16", "--no-report", "--include", "*.mp4", "*.mkv"]
    config, embedded = build_config(parse_args(argv))
    assert not embedded
    assert (config.max_side, config.dtype, config.report) == (224, "bfloat16", False)
    assert config.include == ("*.mp4", "*.mkv")
    assert config.adaptive_block and not config.trust_remote_code  # omitted booleans keep their defaults


def test_flags_override_yaml_and_omitted_flags_leave_it(tmp_path, dirs):
    path = tmp_path / "job.yaml"
    path.write_text("batch_size: 8\nmax_side: 300\nreport: false\nadaptive_block: false\ndtype: float64\n")
    config, _ = build_config(parse_args(["--config", str(path), *dirs, "--batch-size", "2", "--report"]))
    assert (config.batch_size, config.report) == (2, True)
    assert (config.max_side, config.adaptive_block, config.dtype) == (300, False, "float64")


def test_bad_choice_is_an_argparse_error(dirs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*dirs, "--dtype", "int8"])
    assert exit_info.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err


@pytest.mark.slow  # 38 s; `make run` is the same check
def test_embedded_default_captions_the_samples_exactly(tmp_path):
    """`python jobs/caption_videos.py` (make run), from tmp_path so out/sample_videos lands there."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    output = tmp_path / "captions"
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "caption_videos.py"), "--output", str(output)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "out" / "sample_videos" / "captions.jsonl").is_file()
    lines = [line for line in result.stdout.splitlines() if "captions equal the sample's captions.jsonl" in line]
    assert len(lines) == 1, result.stdout[-3000:]
    exact, _, total = lines[0].removeprefix("[flashcap] ").split()[:3]
    summary, _ = json.JSONDecoder().raw_decode(result.stdout, result.stdout.index("\n{\n") + 1)
    assert int(total) == 12 and summary["clips"] == 12 and summary["errors"] == 0
    assert summary["sample_captions_exact"] == int(exact) >= 10, lines[0]


def _job(tmp_path, *flags: str) -> tuple[dict, dict[str, str]]:
    """Run the embedded default job with extra flags: (its report, caption per video)."""
    import pyarrow.parquet as pq

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    output = tmp_path / "captions"
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "caption_videos.py"), "--output", str(output), *flags],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(next(output.glob("_report-*.json")).read_text())
    table = pq.read_table(output, columns=["video_uri", "caption"])
    return report, dict(zip(table.column("video_uri").to_pylist(), table.column("caption").to_pylist()))


@pytest.mark.slow
def test_compile_captions_like_eager_and_the_report_says_it_was_active(tmp_path):
    """`--compile` (aot_eager on CPU: the passes traced and captured, exact) writes the captions the
    eager job writes, and the report says every actor decoded compiled."""
    (tmp_path / "eager").mkdir()
    (tmp_path / "compiled").mkdir()
    eager_report, eager = _job(tmp_path / "eager")
    report, compiled = _job(tmp_path / "compiled", "--compile", "--compile-backend", "aot_eager")
    assert eager_report["compile"] == {"active": False, "fallback": None}
    assert report["compile"] == {"active": True, "fallback": None}
    assert len(compiled) == 12 and {k.rsplit("/", 1)[-1]: v for k, v in compiled.items()} == {
        k.rsplit("/", 1)[-1]: v for k, v in eager.items()
    }


def test_demo_world_v2_has_its_own_samples_models_and_budget(tmp_path, monkeypatch):
    import jobs.caption_videos as job
    from demo import world_v2 as demo_world_v2

    monkeypatch.chdir(tmp_path)
    target = tmp_path / "demo-v2-target"
    monkeypatch.setitem(job.DEMO_V2, "target", target)
    with pytest.raises(ValueError, match="train it with demo/train_target.py --world v2"):
        build_config(parse_args(["--demo-world", "v2"]))
    target.mkdir()
    (target / "config.json").write_text("{}")
    config, embedded = build_config(parse_args(["--demo-world", "v2"]))
    assert embedded and config.model == str(target) and config.max_new_tokens == 200
    assert config.prompt == demo_world_v2.PROMPT
    assert config.input == str((tmp_path / "out" / "sample_videos_v2").resolve())
    assert config.output == str((tmp_path / "out" / "captions_v2").resolve())
    records = [json.loads(line) for line in (tmp_path / "out" / "sample_videos_v2" / "captions.jsonl").open()]
    assert len(records) == 12 and records[0]["caption"] == demo_world_v2.clip_for_seed(0).caption()


PASSWORD = "pa55-W0RD-not-for-logs"


def test_unreachable_endpoint_with_a_password_says_what_failed_without_it(tmp_path):
    """`--s3-endpoint http://admin:PASSWORD@host:port` with nothing listening: botocore quotes the URL."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "in").mkdir()
    (tmp_path / "model").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        AWS_ACCESS_KEY_ID="flashcap-test", AWS_SECRET_ACCESS_KEY="flashcap-test-secret", AWS_DEFAULT_REGION="us-east-1"
    )
    endpoint = f"http://admin:{PASSWORD}@127.0.0.1:{port}"
    argv = ["--input", str(tmp_path / "in"), "--output", "s3://bucket/out/", "--model", str(tmp_path / "model")]
    argv += ["--s3-endpoint", endpoint, "--s3-max-attempts", "1", "--s3-timeout-s", "5", "--num-frames", "4"]
    argv += ["--max-frames", "8"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "caption_videos.py"), *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-3000:]
    assert "[flashcap] cannot list the output s3://bucket/out: EndpointConnectionError" in result.stderr, output[-3000:]
    assert 'Could not connect to the endpoint URL: "http://***@127.0.0.1:' in result.stderr
    assert PASSWORD not in output


def test_a_bad_endpoint_with_a_password_is_reported_without_it(dirs, capsys):
    assert main([*dirs, "--s3-endpoint", f"ftp://admin:{PASSWORD}@minio.example.com"]) == 2
    err = capsys.readouterr().err
    assert "ftp://***@minio.example.com" in err and "must be an http:// or https:// URL" in err
    assert PASSWORD not in err


def test_an_unexpected_error_prints_its_traceback_without_secrets(dirs, capsys, monkeypatch):
    import ray

    import pipeline.run

    def fails(config, log):
        raise RuntimeError(f"GET https://b.s3.amazonaws.com/m?X-Amz-Signature={PASSWORD} failed")

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # no Ray is started
    monkeypatch.setattr(pipeline.run, "run_job", fails)
    assert main(dirs) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: GET https://b.s3.amazonaws.com/m?X-Amz-Signature=*** failed" in err
    assert PASSWORD not in err
