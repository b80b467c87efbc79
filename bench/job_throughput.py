"""Pipeline throughput, best-vs-best: the whole Ray Data job (list, decode, caption, Parquet) on
the same clips with the FLASH drafter and without it (`--no-drafter`), at each batch size, one
run, the two sides alternating; each side's best batch size is compared with the other's, and the
captions of the two sides must be identical.

    python -m bench.job_throughput [--clips N] [--batch-sizes 4,16,32] [--batches-per-actor 1,2]
                                  [--model DIR] [--drafter DIR] [--out report.json]

`--batches-per-actor` lists the settings to measure (batches in flight per caption actor: 1 runs the
processor and the model in turn, 2 overlaps the next batch's processor with the model); each
method's best is over batch sizes and these settings.

Steady state excludes start-up (Ray, actor model load): clips after the first batch over the time
from the first to the last batch (the job report's `steady_clips_per_s`). Batches that decode in one
shared engine finish close together, so with few batches that window is short and noisy: each row
also gives `model_clips_per_s`, clips over the caption actors' busy seconds (the model's time, the
measure of clips per GPU-hour), and the report its own best-vs-best on it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
Captions = dict[str, str]  # video URI -> caption
Run = tuple[str, int, int]  # (method, batch size, batches per actor)
OTHER_SIDE = {"flash": "target", "target": "flash"}


def _captions(folder: Path) -> Captions:
    import pyarrow.parquet as pq

    table = pq.read_table(folder)
    return dict(zip(table.column("video_uri").to_pylist(), table.column("caption").to_pylist()))


def agreement(captions: Captions, reference: Captions) -> float:
    """The fraction of clips, over those in either table, captioned the same in both (0.0 for two
    empty tables: nothing was checked)."""
    uris = captions.keys() | reference.keys()
    return sum(captions.get(uri) == reference.get(uri) for uri in uris) / max(len(uris), 1)


def identical_fractions(captions: dict[Run, Captions], reference_setting: tuple[int, int]) -> dict[Run, float]:
    """Each run's agreement with the other side's run at `reference_setting`: a FLASH run is checked
    against plain decoding and a plain run against FLASH, so no run is ever its own reference."""
    return {
        run: agreement(table, captions[(OTHER_SIDE[run[0]], *reference_setting)]) for run, table in captions.items()
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=96)
    p.add_argument("--model", default=str(ROOT / "models" / "demo-target"))
    p.add_argument("--drafter", default=str(ROOT / "models" / "demo-drafter"))
    p.add_argument("--batch-sizes", default="4,16,32")
    p.add_argument("--batches-per-actor", default="2")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--cpus-per-decode", type=float, default=0.5)
    p.add_argument("--out", default="pipeline_report.json")
    return p.parse_args(argv)


def _run_once(args: argparse.Namespace, videos: Path, out: Path, run: Run, drafter: str | None) -> dict:
    """One whole job over `videos` into `out`; returns its row of the report."""
    from pipeline.config import load_config
    from pipeline.run import run_job

    method, batch, in_flight = run
    config = load_config(
        input=str(videos),
        output=str(out),
        model=args.model,
        drafter=drafter,
        batch_size=batch,
        batches_per_actor=in_flight,
        cpus_per_actor=args.cpus_per_actor,
        cpus_per_decode=args.cpus_per_decode,
        report=False,
    )
    report = run_job(config, log=lambda line: None)
    return {
        "method": method,
        "batch_size": batch,
        "batches_per_actor": in_flight,
        "clips_per_s": report["steady_clips_per_s"],
        "tokens_per_s": report["steady_tokens_per_s"],
        "wall_clips_per_s": report["clips_per_s"],
        "model_clips_per_s": report["rows_written"] / max(report["actor_busy_s"], 1e-9),
        "errors": report["errors"],
        "mean_acceptance_length": report["mean_acceptance_length"],
    }


def _measure(
    args: argparse.Namespace, settings: list[tuple[int, int]], work: Path, videos: Path
) -> tuple[list[dict], dict[Run, Captions]]:
    """Every setting on both sides, alternating which side goes first; the rows and their captions."""
    rows, captions = [], {}
    sides = [("flash", args.drafter), ("target", None)]
    for i, (batch, in_flight) in enumerate(settings):
        for method, drafter in sides if i % 2 == 0 else sides[::-1]:  # alternate which side goes first
            out = work / f"captions-{method}-{batch}-{in_flight}"
            rows.append(_run_once(args, videos, out, (method, batch, in_flight), drafter))
            captions[(method, batch, in_flight)] = _captions(out)
            print(json.dumps(rows[-1]), flush=True)
    return rows, captions


def _best(rows: list[dict], measure: str = "clips_per_s") -> dict[str, dict]:
    """Each method's fastest row by `measure` among those whose captions are identical to the other side's."""
    best = {}
    for row in rows:
        if row["identical"] == 1.0 and row[measure] > best.get(row["method"], {}).get(measure, 0):
            best[row["method"]] = {
                k: row[k] for k in ("batch_size", "batches_per_actor", "clips_per_s", "tokens_per_s", measure)
            }
    return best


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    import ray

    from demo.world import write_videos

    work = Path(tempfile.mkdtemp(prefix="flashcap-pipebench-"))
    videos = work / "videos"
    write_videos(videos, args.clips, seed=700)
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    settings = [(int(b), int(n)) for b in args.batch_sizes.split(",") for n in args.batches_per_actor.split(",")]
    rows, captions = _measure(args, settings, work, videos)
    ray.shutdown()

    identical = identical_fractions(captions, settings[0])
    for row in rows:
        row["identical"] = identical[(row["method"], row["batch_size"], row["batches_per_actor"])]
    best = _best(rows)
    model_best = _best(rows, "model_clips_per_s")
    result = {
        "date": date.today().isoformat(),
        "clips": args.clips,
        "rows": rows,
        "best": best,
        "best_vs_best": best["flash"]["clips_per_s"] / best["target"]["clips_per_s"]
        if {"flash", "target"} <= best.keys()
        else None,
        "model_best": model_best,
        "model_best_vs_best": model_best["flash"]["model_clips_per_s"] / model_best["target"]["model_clips_per_s"]
        if {"flash", "target"} <= model_best.keys()
        else None,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("best", "best_vs_best", "model_best", "model_best_vs_best")}, indent=2))


if __name__ == "__main__":
    main()
