"""The demo world: synthetic captioned videos whose captions can only be known by
watching them.

A scene has one to three objects (shape, colour, size) on a background; each
object moves one way (left to right, right to left, up, down, diagonally, still,
growing, shrinking, bouncing) inside its own horizontal lane. The caption lists
the objects in a fixed colour order, in a sentence template chosen by what is
visible (the number of objects and the background), so a model that sees the
video can produce it word for word. Everything is deterministic per seed.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.decode import sample_frames, sample_indices  # noqa: F401 (the one sampling rule)

SHAPES = ["circle", "square", "triangle", "cross"]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"black": (10, 10, 10), "white": (245, 245, 245), "gray": (128, 128, 128), "brown": (110, 70, 40)}
SIZES = {"small": 20, "large": 34}
MOTIONS = {
    "left_to_right": "moves right",
    "right_to_left": "moves left",
    "up": "moves up",
    "down": "moves down",
    "diagonal": "moves diagonally",
    "still": "stays still",
    "growing": "grows",
    "shrinking": "shrinks",
    "bouncing": "bounces",
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

SIDE = 112  # frame width and height in pixels
FRAMES = 16  # frames per clip
FPS = 8
SAMPLED_FRAMES = 4  # frames a model sees (2 temporal patches of 2 frames for Qwen)

PROMPT = (
    "<|im_start|>user <|vision_start|><|video_pad|><|vision_end|> describe the video .<|im_end|><|im_start|>assistant"
)


@dataclass(frozen=True)
class DemoObject:
    shape: str
    colour: str
    size: str
    motion: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {MOTIONS[self.motion]}"


@dataclass(frozen=True)
class Scene:
    seed: int
    background: str
    objects: tuple[DemoObject, ...]

    def caption(self) -> str:
        """The ground-truth caption: template picked by object count and background."""
        n = len(self.objects)
        count = COUNT_WORDS[n]
        noun = "object" if n == 1 else "objects"
        parts = [o.phrase() for o in self.objects]
        body = " . ".join(parts)
        template = (n + list(BACKGROUNDS).index(self.background)) % 3
        be = "is" if n == 1 else "are"
        if template == 0:
            return f"the video shows {count} {noun} on a {self.background} background . {body} ."
        if template == 1:
            return f"on a {self.background} background there {be} {count} {noun} . {body} . the camera is still ."
        return f"a {self.background} background with {count} {noun} . {body} . nothing else happens ."


def scene_for_seed(seed: int) -> Scene:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    colours = sorted(rng.choice(len(COLOURS), size=n, replace=False).tolist())  # caption order = colour order
    objects = tuple(
        DemoObject(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=list(COLOURS)[c],
            size=list(SIZES)[int(rng.integers(len(SIZES)))],
            motion=list(MOTIONS)[int(rng.integers(len(MOTIONS)))],
        )
        for c in colours
    )
    return Scene(seed=seed, background=list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))], objects=objects)


def _draw(frame: np.ndarray, shape: str, cx: float, cy: float, side: float, colour) -> None:
    h, w, _ = frame.shape
    ys, xs = np.mgrid[0:h, 0:w]
    dx, dy, r = xs - cx, ys - cy, side / 2
    if shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif shape == "square":
        mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "triangle":
        mask = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    else:  # cross
        bar = r / 3
        mask = ((np.abs(dx) <= r) & (np.abs(dy) <= bar)) | ((np.abs(dy) <= r) & (np.abs(dx) <= bar))
    frame[mask] = colour


VERTICAL = {"up", "down", "diagonal", "bouncing"}


def render(scene: Scene, frames: int = FRAMES, side: int = SIDE, only=None) -> np.ndarray:
    """uint8 [T, H, W, 3] frames of the scene (`only`: just these frame indices, same pixels).

    Object i keeps to horizontal band i for sideways motion; vertical movers
    travel the full height in their own column, so every motion is visible
    whatever the number of objects.
    """
    rng = np.random.default_rng(scene.seed + 1_000_003)
    times = list(range(frames)) if only is None else [int(t) for t in only]
    out = np.empty((len(times), side, side, 3), dtype=np.uint8)
    out[:] = BACKGROUNDS[scene.background]
    n = len(scene.objects)
    band = side / n
    for i, obj in enumerate(scene.objects):
        base = SIZES[obj.size] * side / 112
        margin = base / 2 + 2
        column = side / n * (i + 0.5)
        cy0 = band * (i + 0.5)
        start_x = float(rng.uniform(margin, side - margin)) if obj.motion not in VERTICAL else column
        for j, t in enumerate(times):
            a = t / (frames - 1)  # 0 -> 1 over the clip
            cx, cy, s = start_x, cy0, base
            travel = side - 2 * margin
            if obj.motion == "left_to_right":
                cx = margin + a * travel
            elif obj.motion == "right_to_left":
                cx = side - margin - a * travel
            elif obj.motion == "up":
                cy = side - margin - a * travel
            elif obj.motion == "down":
                cy = margin + a * travel
            elif obj.motion == "diagonal":
                cx = margin + a * travel
                cy = margin + a * travel
            elif obj.motion == "growing":
                s = base * (0.5 + a)
            elif obj.motion == "shrinking":
                s = base * (1.5 - a)
            elif obj.motion == "bouncing":
                cy = side - margin - abs(math.sin(a * 2 * math.pi)) * travel * 0.8
            _draw(out[j], obj.shape, cx, cy, s, COLOURS[obj.colour])
    return out


def encode_mp4(frames: np.ndarray, fps: int = FPS) -> bytes:
    """H.264 mp4 bytes of uint8 [T, H, W, 3] frames (PyAV)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decode_frames(data: bytes, count: int = SAMPLED_FRAMES) -> np.ndarray:
    """Decode mp4 bytes with decord and sample `count` frames, as the pipeline does: uint8 [T, H, W, 3]."""
    return sample_frames(data, num_frames=count)


def clip_metadata(count: int = SAMPLED_FRAMES) -> dict:
    """Where `count` frames sampled from a demo clip sit in it (transformers' VideoMetadata fields)."""
    return {"total_num_frames": FRAMES, "fps": float(FPS), "frames_indices": sample_indices(FRAMES, count)}


def model_inputs(processor, prompts: list[str], videos: list[np.ndarray]):
    """A processor batch of demo clips' sampled frames with their metadata, as the caption actor builds it."""
    return processor(
        text=prompts,
        videos=videos,
        video_metadata=[clip_metadata(len(v)) for v in videos],
        do_sample_frames=False,
        return_tensors="pt",
        padding=True,
    )


def write_clips(out_dir: str | Path, seeds: range, clip) -> list[dict]:
    """Write one clip per seed (`clip(seed)` -> (mp4 bytes, record fields)) as clip_<seed>.mp4, and
    captions.jsonl with {"file", "seed", **fields} per clip, to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for s in seeds:
        data, fields = clip(s)
        name = f"clip_{s:06d}.mp4"
        (out / name).write_bytes(data)
        records.append({"file": name, "seed": s, **fields})
    with open(out / "captions.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


def write_videos(out_dir: str | Path, count: int, seed: int = 0) -> list[dict]:
    """Write `count` clips (seeds seed..seed+count-1) and captions.jsonl to out_dir."""

    def clip(s: int) -> tuple[bytes, dict]:
        scene = scene_for_seed(s)
        return encode_mp4(render(scene)), {"caption": scene.caption(), "scene": asdict(scene)}

    return write_clips(out_dir, range(seed, seed + count), clip)


def vocabulary() -> list[str]:
    """Every word a demo caption or prompt can use."""
    words = set("describe the video .".split())
    words |= set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(SIZES) | set(COUNT_WORDS.values())
    for phrase in MOTIONS.values():
        words |= set(phrase.split())
    templates = "the video shows object objects on a background there is are camera still with nothing else happens"
    words |= set(templates.split())
    return sorted(words)
