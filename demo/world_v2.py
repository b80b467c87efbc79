"""Demo world v2: clips in which things happen in order, and long captions that narrate them.

A clip lasts 4 to 8 seconds (8 fps). Objects (shape, colour, size) sit in the cells of a 3 x 3
grid on a background. The clip is cut into equal segments; at the start of each segment after
the first, one event happens:

- enter: a new object slides in from the left or right edge to an empty cell of its row;
- leave: an object slides out to the left or right edge;
- move: an object slides to another cell of its row;
- recolour: an object turns another colour (no two objects share a colour);
- grow / shrink: a small object becomes large, or a large one small;
- bump: two objects of one row slide toward each other, touch, and slide back.

The caption narrates the clip in time order: the objects at first (with their places), each
event with a connective ("then", "after that", ...), and the objects at the end. Phrasing varies
per clip (connectives, verbs, sentence openings), drawn from the seed, so the words that carry
facts (colours, shapes, sizes, places, events and their order) can only be known by watching.
`facts` parses a caption back into those facts, and `clause_accuracy` scores one caption against
the truth clause by clause.

Everything is deterministic per seed. Seeds >= 1,000,000 are for training, below are held out.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from demo.world import BACKGROUNDS, COLOURS, SHAPES, _draw, decode_frames, encode_mp4, write_clips
from pipeline.decode import sample_indices

SIDE = 112
FPS = 8
SAMPLED_FRAMES = 16  # frames a model sees: 8 temporal patches of 2 frames for Qwen
SIZES = {"small": 22, "large": 32}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
MAX_OBJECTS = 4
EVENTS = ("enter", "leave", "move", "recolour", "grow", "shrink", "bump")
TRAIN_SEED_START = 1_000_000

PROMPT = (
    "<|im_start|>user <|vision_start|><|video_pad|><|vision_end|> narrate the video in order .<|im_end|>"
    "<|im_start|>assistant"
)

# Phrasing, drawn per clip: every variant names the same facts.
OPENINGS = ("at first", "at the start", "in the beginning")
CONNECTIVES = ("then", "after that", "next", "later")
LAST = ("finally", "in the end", "at last")
ENDINGS = ("at the end", "when the video ends", "by the end")
VERBS = {
    "enter": ("enters from the {side} and stops {place}", "comes in from the {side} and stops {place}"),
    "leave": ("leaves to the {side}", "exits on the {side}"),
    "move": ("slides {place}", "moves {place}"),
    "recolour": ("turns {colour}", "becomes {colour}", "changes colour to {colour}"),
    "grow": ("grows", "gets bigger"),
    "shrink": ("shrinks", "gets smaller"),
    "bump": ("bump into each other", "collide and bounce back"),
}


def place(row: int, col: int) -> str:
    """'at the top left', 'in the middle', 'on the right', ..."""
    if row == 1:
        return "in the middle" if col == 1 else f"on the {COLUMNS[col]}"
    return f"at the {ROWS[row]}" if col == 1 else f"at the {ROWS[row]} {COLUMNS[col]}"


@dataclass
class Thing:
    shape: str
    colour: str
    size: str
    row: int
    col: int

    def name(self) -> str:
        return f"the {self.size} {self.colour} {self.shape}"

    def describe(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {place(self.row, self.col)}"


@dataclass
class Event:
    kind: str
    who: int  # index into the clip's things (the first object of a bump)
    other: int = -1  # bump: the second object
    side: str = ""  # enter / leave: left or right
    col: int = -1  # enter / move: the cell's column
    row: int = -1  # enter: the cell's row
    colour: str = ""  # recolour: the new colour


@dataclass
class Clip:
    seed: int
    background: str
    seconds: int
    things: list[Thing]  # every object that appears, in its first state
    start: list[int]  # objects present at first
    events: list[Event]
    phrasing: dict = field(default_factory=dict)

    @property
    def frames(self) -> int:
        return self.seconds * FPS

    def states(self) -> list[list[Thing | None]]:
        """The objects' states in each segment (None: not present)."""
        now: list[Thing | None] = [None] * len(self.things)
        for i in self.start:
            now[i] = Thing(**asdict(self.things[i]))
        out = [[None if t is None else Thing(**asdict(t)) for t in now]]
        for e in self.events:
            if e.kind == "enter":
                now[e.who] = Thing(**{**asdict(self.things[e.who]), "col": e.col})
            elif e.kind == "leave":
                now[e.who] = None
            elif e.kind == "move":
                now[e.who].col = e.col
            elif e.kind == "recolour":
                now[e.who].colour = e.colour
            elif e.kind in ("grow", "shrink"):
                now[e.who].size = "large" if e.kind == "grow" else "small"
            out.append([None if t is None else Thing(**asdict(t)) for t in now])
        return out

    def caption(self) -> str:
        states, p = self.states(), self.phrasing
        first = [t for t in states[0] if t is not None]
        last = [t for t in states[-1] if t is not None]
        sentences = [f"{p['opening']} {_there(len(first))} on a {self.background} background : {_list(first)}"]
        for k, e in enumerate(self.events):
            before = states[k]
            connective = p["last"] if k == len(self.events) - 1 else p["connectives"][k]
            sentences.append(f"{connective} {self._clause(e, before, p['verbs'][k])}")
        if last:
            sentences.append(f"{p['ending']} {_there(len(last))} : {_list(last)}")
        else:
            sentences.append(f"{p['ending']} the background is empty")
        return " . ".join(sentences) + " ."

    def _clause(self, e: Event, before: list[Thing | None], variant: int) -> str:
        verb = VERBS[e.kind][variant % len(VERBS[e.kind])]
        if e.kind == "enter":
            t = self.things[e.who]
            return f"a {t.size} {t.colour} {t.shape} " + verb.format(side=e.side, place=place(t.row, e.col))
        who = before[e.who]
        if e.kind == "bump":
            return f"{who.name()} and {before[e.other].name()} " + verb
        return f"{who.name()} " + verb.format(side=e.side, place=f"to the {COLUMNS[e.col]}", colour=e.colour)


def _there(n: int) -> str:
    words = {1: "one", 2: "two", 3: "three", 4: "four"}
    return f"there is {words[n]} object" if n == 1 else f"there are {words[n]} objects"


def _list(things: list[Thing]) -> str:
    return " , ".join(t.describe() for t in sorted(things, key=lambda t: (t.row, t.col)))


def _new_thing(rng: np.random.Generator, used_colours: set[str], row: int, col: int) -> Thing:
    """An object in a colour no object of the clip has had yet (the colour is then used)."""
    colour = str(rng.choice(sorted(set(COLOURS) - used_colours)))
    used_colours.add(colour)
    return Thing(SHAPES[int(rng.integers(len(SHAPES)))], colour, list(SIZES)[int(rng.integers(2))], row, col)


def _enter_options(rng: np.random.Generator, taken: set[tuple[int, int]]) -> list[Event]:
    """An object may enter every free cell it can slide to: from the side nearer its cell (either
    side, drawn, for the centre), over no other object of its row."""
    options = []
    for row in range(3):
        free = [c for c in range(3) if (row, c) not in taken]
        for col in free:
            side = "left" if col == 0 or (col == 1 and rng.random() < 0.5) else "right"
            path = range(0, col) if side == "left" else range(col + 1, 3)
            if all((row, c) not in taken for c in path):
                options.append(Event("enter", -1, side=side, col=col, row=row))
    return options


def _object_options(
    i: int, now: list[Thing | None], present: list[int], taken: set[tuple[int, int]], may_empty: bool
) -> list[Event]:
    """What object `i` may do next: leave (unless it is the last one and `may_empty` is false), move
    along its row, recolour, grow or shrink, bump into a later object of its row."""
    t = now[i]
    row_taken = {c for (r, c) in taken if r == t.row}
    options = []
    if len(present) > 1 or may_empty:
        for side, path in (("left", range(0, t.col)), ("right", range(t.col + 1, 3))):
            if not (row_taken & set(path)):
                options.append(Event("leave", i, side=side))
    for col in range(3):
        lo, hi = sorted((col, t.col))
        if col != t.col and not (row_taken & set(range(lo, hi + 1)) - {t.col}):
            options.append(Event("move", i, col=col))
    for colour in sorted(set(COLOURS) - {now[k].colour for k in present}):
        options.append(Event("recolour", i, colour=colour))
    options.append(Event("grow" if t.size == "small" else "shrink", i))
    for j in present:
        u = now[j]
        if j > i and u.row == t.row and abs(u.col - t.col) >= 1:
            between = set(range(min(t.col, u.col) + 1, max(t.col, u.col)))
            if not (row_taken & between):
                options.append(Event("bump", i, other=j) if t.col < u.col else Event("bump", j, other=i))
    return options


def _next_event(rng: np.random.Generator, clip: Clip, used_colours: set[str], last: bool) -> Event:
    """One event drawn for what the clip's objects may do now: the kind first (each kind equally
    likely among those possible), then one of its options. An object that enters joins `clip.things`."""
    now = clip.states()[-1]
    present = [i for i, t in enumerate(now) if t is not None]
    taken = {(now[i].row, now[i].col) for i in present}
    options: list[Event] = []
    if len(present) < MAX_OBJECTS and set(COLOURS) - used_colours:
        options += _enter_options(rng, taken)
    for i in present:
        options += _object_options(i, now, present, taken, may_empty=last)
    kinds = sorted({o.kind for o in options}, key=EVENTS.index)
    kind = kinds[int(rng.integers(len(kinds)))]
    choice = [o for o in options if o.kind == kind]
    event = choice[int(rng.integers(len(choice)))]
    if event.kind == "enter":
        clip.things.append(_new_thing(rng, used_colours, event.row, event.col))
        event = Event("enter", len(clip.things) - 1, side=event.side, col=event.col, row=event.row)
    if event.kind == "recolour":
        used_colours.add(event.colour)
    return event


def _phrasing(rng: np.random.Generator, n_events: int) -> dict:
    return {
        "opening": OPENINGS[int(rng.integers(len(OPENINGS)))],
        "connectives": [CONNECTIVES[0]] + [CONNECTIVES[int(rng.integers(len(CONNECTIVES)))] for _ in range(n_events)],
        "last": LAST[int(rng.integers(len(LAST)))],
        "ending": ENDINGS[int(rng.integers(len(ENDINGS)))],
        "verbs": [int(rng.integers(6)) for _ in range(n_events)],
    }


def clip_for_seed(seed: int) -> Clip:
    rng = np.random.default_rng([seed, 2])
    seconds = int(rng.integers(4, 9))
    n_events = int(rng.integers(4, 7))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    cells = [(r, c) for r in range(3) for c in range(3)]
    n_first = int(rng.integers(1, 4))
    used_colours: set[str] = set()
    things = [
        _new_thing(rng, used_colours, *cells[int(k)]) for k in rng.choice(len(cells), size=n_first, replace=False)
    ]
    clip = Clip(seed, background, seconds, things, list(range(n_first)), [])
    for k in range(n_events):
        clip.events.append(_next_event(rng, clip, used_colours, last=k == n_events - 1))
    clip.phrasing = _phrasing(rng, n_events)
    return clip


def _cell_centre(row: int, col: float) -> tuple[float, float]:
    cell = SIDE / 3
    return cell * (col + 0.5), cell * (row + 0.5)


def render(clip: Clip, only=None) -> np.ndarray:
    """uint8 [T, H, W, 3] frames of the clip (`only`: just these frame indices, same pixels)."""
    total = clip.frames
    times = list(range(total)) if only is None else [int(t) for t in only]
    segments = len(clip.events) + 1
    states = clip.states()
    out = np.empty((len(times), SIDE, SIDE, 3), dtype=np.uint8)
    out[:] = BACKGROUNDS[clip.background]
    edge = {"left": -1.0, "right": 3.0}  # columns just off the frame
    for j, t in enumerate(times):
        position = t / total * segments
        k = min(segments - 1, int(position))
        a = min(1.0, (position - k) / 0.6)  # motions take the first 60% of their segment
        event = clip.events[k - 1] if k > 0 else None
        for i, thing in enumerate(states[k]):
            before = states[k - 1][i] if k > 0 else thing
            col = None if thing is None else float(thing.col)
            if event is not None and i == event.who and event.kind == "enter":
                col = edge[event.side] + a * (thing.col - edge[event.side])
            elif event is not None and i == event.who and event.kind == "leave":
                col, thing = before.col + a * (edge[event.side] - before.col), before
            elif event is not None and i == event.who and event.kind == "move":
                col = before.col + a * (thing.col - before.col)
            elif event is not None and event.kind == "bump" and i in (event.who, event.other):
                partner = states[k][event.other if i == event.who else event.who]
                gap = abs(partner.col - thing.col) * SIDE / 3
                touch = (gap - SIZES[thing.size] / 2 - SIZES[partner.size] / 2) / 2 / (SIDE / 3)
                reach = touch * (1 - abs(1 - 2 * a))  # out and back
                col = thing.col + (reach if thing.col < partner.col else -reach)
            if thing is None:
                continue
            cx, cy = _cell_centre(thing.row, col)
            _draw(out[j], thing.shape, cx, cy, SIZES[thing.size], COLOURS[thing.colour])
    return out


def clip_metadata(clip: Clip, count: int = SAMPLED_FRAMES) -> dict:
    return {"total_num_frames": clip.frames, "fps": float(FPS), "frames_indices": sample_indices(clip.frames, count)}


def clip_frames(clip: Clip, rendered: bool = False, count: int = SAMPLED_FRAMES) -> tuple[np.ndarray, dict]:
    """The `count` frames a model sees of `clip` and their metadata: decoded from the clip's H.264
    file, as a captioning job reads it, or (rendered) the renderer's own frames, without the codec."""
    metadata = clip_metadata(clip, count)
    if rendered:
        return render(clip, only=metadata["frames_indices"]), metadata
    return decode_frames(encode_mp4(render(clip), fps=FPS), count), metadata


def write_videos(out_dir: str | Path, count: int, seed: int = 0) -> list[dict]:
    """Write `count` clips (seeds seed..seed+count-1) and captions.jsonl (caption and facts) to out_dir."""

    def clip(s: int) -> tuple[bytes, dict]:
        c = clip_for_seed(s)
        return encode_mp4(render(c), fps=FPS), {"caption": c.caption(), "facts": facts(c.caption())}

    return write_clips(out_dir, range(seed, seed + count), clip)


# ---- reading captions back -------------------------------------------------------------------

_OBJ = r"a (small|large) (\w+) (\w+) (at the \w+(?: \w+)?|in the middle|on the \w+)"
_NAME = r"the (small|large) (\w+) (\w+)"


def facts(caption: str) -> dict:
    """A caption's facts: {"background", "first": [...], "events": [...], "last": [...]}, each
    object as "size colour shape place" and each event as a short tuple-like string. Sentences
    that do not parse are kept as "?" so that they count as wrong."""
    sentences = [s.strip() for s in caption.split(" . ") if s.strip(" .")]
    out: dict = {"background": "", "first": [], "events": [], "last": []}
    if not sentences:
        return out
    openings, endings = "|".join(OPENINGS), "|".join(ENDINGS)
    head = re.match(rf"(?:{openings}) there (?:is|are) \w+ objects? on a (\w+) background : (.*)", sentences[0])
    if head:
        out["background"] = head.group(1)
        out["first"] = [" ".join(m) for m in re.findall(_OBJ, head.group(2))]
    tail = sentences[-1].rstrip(" .")
    end = re.match(rf"(?:{endings}) (?:there (?:is|are) \w+ objects? : (.*)|the background is empty)", tail)
    body = sentences[1:-1] if end else sentences[1:]
    if end:
        out["last"] = [" ".join(m) for m in re.findall(_OBJ, end.group(1) or "")]
    connective = "|".join(CONNECTIVES + LAST)
    for s in body:
        m = re.match(rf"(?:{connective}) (.*)", s)
        out["events"].append(_event(m.group(1)) if m else "?")
    return out


def _event(clause: str) -> str:
    m = re.match(r"a (small|large) (\w+) (\w+) (?:enters|comes in) from the (\w+) and stops (.*)", clause)
    if m:
        return "enter " + " ".join(m.groups())
    m = re.match(rf"{_NAME} and {_NAME} (?:bump into each other|collide and bounce back)", clause)
    if m:
        return "bump " + " ".join(m.groups())
    m = re.match(rf"{_NAME} (.*)", clause)
    if not m:
        return "?"
    who, rest = " ".join(m.groups()[:3]), m.group(4)
    for kind, pattern in (
        ("leave", r"(?:leaves to|exits on) the (\w+)"),
        ("move", r"(?:slides|moves) to the (\w+)"),
        ("recolour", r"(?:turns|becomes|changes colour to) (\w+)"),
        ("grow", r"(?:grows|gets bigger)()"),
        ("shrink", r"(?:shrinks|gets smaller)()"),
    ):
        hit = re.fullmatch(pattern, rest)
        if hit:
            return f"{kind} {who} {hit.group(1)}".strip()
    return "?"


ATTRIBUTES = ("size", "colour", "shape", "place")


def _hits(got: list[str], want: list[str]) -> int:
    """How many of `want` are in `got`, as multisets."""
    pool = list(got)
    for item in want:
        if item in pool:
            pool.remove(item)
    return len(got) - len(pool)


def clause_accuracy(got: str, want: str) -> dict:
    """Clause by clause: the background, each object at first and at the end (as a multiset), and
    each event in its place in the order. Returns counts (of right clauses and of clauses, by part
    and by object attribute) that add up over clips; clause_summary turns a sum into shares."""
    g, w = facts(got), facts(want)
    background = int(g["background"] == w["background"])
    objects_right = sum(_hits(g[part], w[part]) for part in ("first", "last"))
    objects = sum(max(len(w[part]), len(g[part])) for part in ("first", "last"))
    events = sum(a == b for a, b in zip(g["events"], w["events"]))
    score = {
        "clips": 1,
        "right": background + objects_right + events,
        "total": 1 + objects + max(len(w["events"]), len(g["events"])),
        "background_right": background,
        "objects_right": objects_right,
        "objects": objects,
        "events_right": events,
        "events": len(w["events"]),
        "events_found": _hits(g["events"], w["events"]),  # anywhere in the order
        "attributes": 0,
        **{a: 0 for a in ATTRIBUTES},
    }
    for part in ("first", "last"):
        _count_attributes(g[part], w[part], score)
    return score


def clause_summary(counts: dict) -> dict:
    """Shares right from clause_accuracy's counts summed over clips: every clause, the
    backgrounds, the objects (at first and at the end), the events in their place and anywhere in
    the order, and each attribute of the objects."""
    share = lambda right, total: round(counts[right] / max(1, counts[total]), 4)  # noqa: E731
    return {
        "clauses": share("right", "total"),
        "background": share("background_right", "clips"),
        "objects": share("objects_right", "objects"),
        "events_in_place": share("events_right", "events"),
        "events_anywhere": share("events_found", "events"),
        **{a: share(a, "attributes") for a in ATTRIBUTES},
    }


def _count_attributes(got: list[str], want: list[str], score: dict) -> None:
    """Per wanted object, which of size, colour, shape and place the caption got right: each is
    compared with the unused described object that shares the most with it."""
    split = lambda o: (*o.split()[:3], " ".join(o.split()[3:]))  # noqa: E731
    pool = [split(o) for o in got]
    for obj in map(split, want):
        score["attributes"] += 1
        if not pool:
            continue
        best = max(pool, key=lambda o: sum(a == b for a, b in zip(o, obj)))
        pool.remove(best)
        for name, a, b in zip(ATTRIBUTES, best, obj):
            score[name] += a == b


def vocabulary() -> list[str]:
    """Every word a v2 caption or prompt can use."""
    words = set("narrate the video in order . , :".split())
    words |= set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(SIZES) | set(ROWS) | set(COLUMNS)
    words |= set("there is are one two three four object objects on a background at in empty".split())
    for group in (OPENINGS, CONNECTIVES, LAST, ENDINGS):
        for phrase in group:
            words |= set(phrase.split())
    for variants in VERBS.values():
        for v in variants:
            words |= set(re.sub(r"\{\w+\}", "", v).split())
    words |= {"left", "right", "and", "a", "to"}
    return sorted(words)
