"""Caption a video collection with FLASH on Ray Data.

With no arguments this is the embedded default: it starts a local Ray, writes
sample demo videos to ./out/sample_videos, captions them with the bundled demo
target and drafter, writes Parquet under ./out/captions/, and counts how many
captions equal the samples' true captions (out/sample_videos/captions.jsonl).

Every CaptionConfig field is a flag (`--max-side 224`, `--no-report`); flags
override the YAML file given with --config.

On a cluster:
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/caption_videos.py \\
        --input s3://bucket/clips/ --output s3://bucket/captions/ \\
        --model s3://bucket/models/Qwen2.5-VL-7B-Instruct/ --drafter s3://bucket/models/drafter/ --gpus-per-actor 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from pipeline.config import CaptionConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO_TARGET = ROOT / "models" / "demo-target"
DEMO_DRAFTER = ROOT / "models" / "demo-drafter"
SAMPLE_VIDEOS = Path("out") / "sample_videos"  # relative to the working directory, as is SAMPLE_OUTPUT
SAMPLE_OUTPUT = Path("out") / "captions"
SAMPLE_COUNT = 12
# --demo-world v2: demo world v2's samples, models and caption budget (docs/demo.md).
DEMO_V2 = {
    "target": ROOT / "models" / "demo-v2-target",
    "drafter": ROOT / "models" / "demo-v2-drafter",
    "videos": Path("out") / "sample_videos_v2",
    "output": Path("out") / "captions_v2",
    "max_new_tokens": 200,
}


def _field_flag(name: str, field: FieldInfo) -> tuple[str, dict[str, Any]]:
    """The argparse flag and keyword arguments for one CaptionConfig field, read off its annotation.

    Every flag defaults to None, so a flag that is not given never overrides the YAML file."""
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None: the flag takes an X
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else Any
    origin, type_args = typing.get_origin(annotation), typing.get_args(annotation)
    default = "required" if field.is_required() else f"default: {field.get_default(call_default_factory=True)!r}"
    help_text = f"{field.description} ({default})".replace("%", "%%")  # argparse %-formats help
    kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is typing.Literal:
        kwargs.update(type=type(type_args[0]), choices=type_args)
    elif origin in (tuple, list) and (origin is list or type_args[1:] == (...,)) and type_args[0] in (int, float, str):
        kwargs.update(type=type_args[0], nargs="+", metavar=name.upper())
    elif annotation in (int, float, str):
        kwargs["type"] = annotation
    else:  # any other type: the value is read as YAML and pydantic validates it
        import yaml

        kwargs.update(type=yaml.safe_load, metavar="YAML")
    return "--" + name.replace("_", "-"), kwargs


def build_parser() -> argparse.ArgumentParser:
    """One flag per CaptionConfig field (generated from the model) plus --config and --no-drafter."""
    from pipeline.config import CaptionConfig

    # No abbreviations: a field added later must not change what a short flag in a scheduled job means.
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--config", help="YAML file with CaptionConfig fields (flags override it)")
    p.add_argument("--no-drafter", action="store_true", help="plain decoding (same captions, slower)")
    p.add_argument(
        "--demo-world",
        choices=("v1", "v2"),
        default="v1",
        help="the embedded default's demo world: v2 has long, time-ordered captions (docs/demo.md)",
    )
    fields = p.add_argument_group("CaptionConfig fields (each overrides the YAML file)")
    for name, field in CaptionConfig.model_fields.items():
        flag, kwargs = _field_flag(name, field)
        fields.add_argument(flag, **kwargs)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_config(args: argparse.Namespace) -> tuple[CaptionConfig, bool]:
    from pipeline.config import CaptionConfig, load_config

    overrides = {name: getattr(args, name) for name in CaptionConfig.model_fields}  # None: not given
    embedded = args.config is None and args.input is None
    if embedded and args.demo_world == "v2":
        from demo import world_v2 as demo_world_v2

        if not (DEMO_V2["target"] / "config.json").is_file():
            raise ValueError(
                f"demo world v2's target is not trained yet ({DEMO_V2['target']} is missing): "
                "train it with demo/train_target.py --world v2 (docs/demo.md)"
            )
        videos = DEMO_V2["videos"]
        if not (videos / "captions.jsonl").exists():
            print(f"[flashcap] writing {SAMPLE_COUNT} sample demo v2 videos to {videos}/")
            demo_world_v2.write_videos(videos, SAMPLE_COUNT, seed=0)
        overrides["input"] = str(videos.resolve())
        overrides["output"] = overrides["output"] or str(DEMO_V2["output"].resolve())
        overrides["model"] = overrides["model"] or str(DEMO_V2["target"])
        if overrides["drafter"] is None and DEMO_V2["drafter"].is_dir():
            overrides["drafter"] = str(DEMO_V2["drafter"])
        overrides["prompt"] = overrides["prompt"] or demo_world_v2.PROMPT
        overrides["max_new_tokens"] = overrides["max_new_tokens"] or DEMO_V2["max_new_tokens"]
    elif embedded:
        from demo.world import write_videos

        if not (SAMPLE_VIDEOS / "captions.jsonl").exists():
            print(f"[flashcap] writing {SAMPLE_COUNT} sample demo videos to {SAMPLE_VIDEOS}/")
            write_videos(SAMPLE_VIDEOS, SAMPLE_COUNT, seed=0)
        overrides["input"] = str(SAMPLE_VIDEOS.resolve())
        overrides["output"] = overrides["output"] or str(SAMPLE_OUTPUT.resolve())
        overrides["model"] = overrides["model"] or str(DEMO_TARGET)
        if overrides["drafter"] is None and DEMO_DRAFTER.is_dir():
            overrides["drafter"] = str(DEMO_DRAFTER)
    if embedded:
        cpus = os.cpu_count() or 1
        overrides["cpus_per_actor"] = overrides["cpus_per_actor"] or max(1.0, cpus - 1.0)
        overrides["cpus_per_decode"] = overrides["cpus_per_decode"] or 0.5
    if args.no_drafter:
        overrides["drafter"] = None
        overrides["suffix"] = False
    config = load_config(args.config, **overrides)
    if args.no_drafter and config.drafter is not None:
        config = config.model_copy(update={"drafter": None, "suffix": False})
    return config, embedded


def _words(text: str) -> str:
    return " ".join(text.split())


def _sample_pairs(config: CaptionConfig, videos: Path) -> list[tuple[str | None, str]]:
    """(newest caption or None for an error row or no row, true caption) of each sample video."""
    from pipeline.storage import OutputStore, S3Settings

    records = [json.loads(line) for line in (videos / "captions.jsonl").read_text().splitlines() if line.strip()]
    want = {str((videos / r["file"]).resolve()): r["caption"] for r in records}
    settings = S3Settings(config.s3_endpoint, config.s3_region, config.s3_max_attempts, config.s3_timeout_s)
    newest: dict[str, dict] = {}
    for row in OutputStore(config.output, settings).read_table().to_pylist():
        uri = row["video_uri"]
        if uri in want and (uri not in newest or row["finished_at"] > newest[uri]["finished_at"]):
            newest[uri] = row
    got = {uri: row["caption"] for uri, row in newest.items() if not row["error"]}
    return [(got.get(uri), caption) for uri, caption in want.items()]


def sample_captions_exact(config: CaptionConfig, videos: Path = SAMPLE_VIDEOS) -> tuple[int, int]:
    """(exact, total): the newest caption of each sample video against its true caption in
    captions.jsonl, equal after whitespace normalisation; an error row counts as not equal."""
    pairs = _sample_pairs(config, videos)
    return sum(got is not None and _words(got) == _words(want) for got, want in pairs), len(pairs)


def sample_clause_accuracy(config: CaptionConfig, videos: Path) -> float:
    """Demo world v2: the share of the samples' clauses the captions get right (an error row: none)."""
    from demo.world_v2 import clause_accuracy

    right = total = 0
    for got, want in _sample_pairs(config, videos):
        score = clause_accuracy(_words(got or ""), _words(want))
        right, total = right + score["right"], total + score["total"]
    return right / max(1, total)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config, embedded = build_config(args)
    except ValueError as err:
        _say(err)
        return 2

    from pipeline.run import run_job

    _init_ray()
    from pipeline.run import JobIncomplete
    from pipeline.storage import StorageError

    try:
        report = run_job(config, log=(lambda line: print(line, file=sys.stderr)) if config.dry_run else print)
    except StorageError as err:  # permanent storage problems: say what, before any model loads
        _say(err)
        return 3
    except JobIncomplete as err:  # the cluster kept losing work: what was written stays; a rerun finishes
        _say(err)
        return 4
    except Exception:  # anything else: its traceback, as Python would print it, with no secret in it
        _say(traceback.format_exc().rstrip())
        return 1
    if config.dry_run:  # the plan, as one JSON line last; no model was loaded
        print(json.dumps(report))
        return 0
    _print_summary(config, report, embedded, args.demo_world)
    return 0


def _say(message: object) -> None:
    """An error for the user, on stderr, redacted: storage errors quote URLs, credentials included."""
    from pipeline.config import redact

    print(f"[flashcap] {redact(str(message))}", file=sys.stderr)


def _init_ray() -> None:
    import ray

    if ray.is_initialized():  # called from a process that already holds a Ray (a notebook, a test)
        pass
    elif os.environ.get("RAY_ADDRESS"):  # under `ray job submit`, or pointed at a cluster
        ray.init()
    else:  # a local Ray bound to loopback
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)


def _print_summary(config: CaptionConfig, report: dict, embedded: bool, demo_world: str) -> None:
    """The report's headline numbers as JSON, and for the embedded default how close the captions came."""
    from pipeline.config import redact

    keys = (
        "clips",
        "errors",
        "clips_per_s",
        "tokens_per_s",
        "mean_acceptance_length",
        "rows_written",
        "missing",
        "rounds",
        "worker_crashes",
        "memory",
        "parts",
    )
    summary = {k: report[k] for k in keys}
    summary["sample_captions_exact"] = None  # only the embedded default knows the true captions
    if embedded:
        videos = DEMO_V2["videos"] if demo_world == "v2" else SAMPLE_VIDEOS
        exact, total = sample_captions_exact(config, videos)
        print(f"[flashcap] {exact} of {total} captions equal the sample's captions.jsonl")
        summary["sample_captions_exact"] = exact
        if demo_world == "v2":
            summary["sample_clause_accuracy"] = sample_clause_accuracy(config, videos)
            print(f"[flashcap] clauses right: {summary['sample_clause_accuracy']:.1%}")
    print(json.dumps(redact(summary), indent=2))
    print(f"[flashcap] captions in {redact(config.output)}")


if __name__ == "__main__":
    sys.exit(main())
