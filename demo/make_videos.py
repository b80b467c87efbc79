"""Write synthetic captioned demo videos: H.264 mp4 files and captions.jsonl.

python -m demo.make_videos --out DIR --count N --seed S [--world v2]
"""

from __future__ import annotations

import argparse

from demo import world as demo_world
from demo import world_v2 as demo_world_v2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--count", type=int, default=20, help="number of clips")
    parser.add_argument("--seed", type=int, default=0, help="first scene seed; clip i uses seed + i")
    parser.add_argument("--world", choices=("v1", "v2"), default="v1", help="v2: long, time-ordered captions")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be >= 1")
    world = demo_world if args.world == "v1" else demo_world_v2
    records = world.write_videos(args.out, args.count, args.seed)
    print(f"wrote {len(records)} clips and captions.jsonl to {args.out}")


if __name__ == "__main__":
    main()
