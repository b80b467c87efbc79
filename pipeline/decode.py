"""Reading and decoding one video in a CPU task: evenly sampled frames, downscaled so the longer
side fits `max_side`. Any failure becomes an `error` on the row. A video is read where it lies (no
temporary files): a local file from disk, an object of up to STREAM_ABOVE bytes in one GET, a larger
one as a stream of ranged reads (`VideoSource`), so a video of gigabytes costs its task a few
blocks of memory, not its size.

Two decoders give the same frames, pixel for pixel: decord where it is installed (it has wheels
for x86-64 only), else PyAV; `FLASHCAP_DECODER=pyav|decord` forces one. Both count frames as
decord does (the video stream's packets), give its average frame rate, and convert to RGB with
the filter graph decord runs: the display rotation, then `scale=W:H` with bilinear swscale. decord
reads bytes or a local file; a streamed object goes to PyAV."""

from __future__ import annotations

import bisect
import functools
import io
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import faults
from pipeline.config import VIDEO_PATTERNS
from pipeline.inputs import is_shard, name_matches
from pipeline.ledger import Guard
from pipeline.storage import S3Settings, open_object, read_object, row_key

DECODER_ENV = "FLASHCAP_DECODER"
DECODERS = ("decord", "pyav")
STREAM_ABOVE = 256 << 20  # bytes: a larger object is decoded from ranged reads, not from memory


@dataclass(frozen=True)
class VideoSource:
    """A video's bytes: in memory (`data`), a local file (`path`), or an object streamed by ranged
    reads (`uri`, with its `size` and the job's S3 settings)."""

    data: bytes | None = None
    path: str | None = None
    uri: str | None = None
    size: int = 0
    settings: S3Settings = S3Settings()

    @classmethod
    def of(cls, uri: str, settings: S3Settings, size: int = 0) -> VideoSource:
        """The source for a listed object: a local file as it is, a small object read whole, a large
        (or unsized) one streamed."""
        if not uri.startswith("s3://"):
            return cls(path=uri, size=os.path.getsize(uri))
        if 0 < size <= STREAM_ABOVE:
            return cls(data=read_object(uri, settings))
        return cls(uri=uri, size=size, settings=settings)

    @property
    def nbytes(self) -> int:
        return len(self.data) if self.data is not None else self.size

    def open(self) -> io.BufferedIOBase:
        """A fresh seekable stream over the bytes."""
        if self.data is not None:
            return io.BytesIO(self.data)
        return open_object(self.path or self.uri, self.settings, self.size or None)

    def for_decord(self):
        """What decord's VideoReader can read (it copies a file object whole into memory, so a
        streamed object is not offered), or None."""
        return io.BytesIO(self.data) if self.data is not None else self.path


@dataclass(frozen=True)
class VideoInfo:
    """Where the sampled frames sit in the source video."""

    total_frames: int  # frames in the video stream (decord's len(reader))
    fps: float  # the stream's average frame rate (0.0 when the container gives none)
    indices: tuple[int, ...]  # the source frame index of each sampled frame


def sample_indices(total: int, count: int) -> list[int]:
    """`count` evenly spaced frame indices over `total` frames (fewer if the video is shorter)."""
    if total <= 0:
        return []
    return np.linspace(0, total - 1, num=min(count, total)).round().astype(int).tolist()


def decoder() -> str:
    """The decoder in use: $FLASHCAP_DECODER if set, else decord when it imports, else PyAV."""
    forced = os.environ.get(DECODER_ENV, "").strip().lower()
    if forced and forced not in DECODERS:
        raise ValueError(f"{DECODER_ENV}={forced!r}: use one of {', '.join(DECODERS)}")
    if forced == "decord" and not _decord_available():
        raise ValueError(f"{DECODER_ENV}=decord but decord cannot be imported (its wheels are x86-64 only)")
    return forced or ("decord" if _decord_available() else "pyav")


@functools.cache
def _decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except (ImportError, OSError):  # not installed, or its bundled libraries do not load
        return False
    return True


def probe(source: VideoSource) -> tuple[int, int]:
    """Check with PyAV (headers only) that the bytes hold a container with a video stream, so that
    non-videos get a clear error and never reach decord (which echoes the bytes it fails on).
    Returns the video stream's coded (width, height), before any display rotation."""
    import av

    try:
        with source.open() as stream, av.open(stream, mode="r") as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["no streams"]
                raise ValueError(f"no video stream (the file holds: {', '.join(kinds)})")
            stream = _video_stream(container)
            return stream.codec_context.width, stream.codec_context.height
    except av.error.FFmpegError as err:
        reason = _reason(err)
        raise ValueError(
            f"not a readable video: {source.nbytes} bytes, no container ffmpeg can open ({reason})"
        ) from None


def _video_stream(container):
    """The stream decord decodes: FFmpeg's best video stream."""
    return container.streams.best("video") or container.streams.video[0]


def _reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or type(err).__name__


def _clockwise(ccw_degrees: float) -> int:
    """decord's rotation: the display matrix's angle made clockwise, in [0, 360)."""
    return int(math.fmod(-ccw_degrees, 360) % 360)


def _output_size(width: int, height: int, rotation: int, max_side: int) -> tuple[int, int]:
    """(width, height) of the frames we keep: the displayed picture, downscaled (never up) so its
    longer side fits max_side, even sides as the scaler wants."""
    if rotation in (90, 270):
        width, height = height, width
    scale = max_side / max(height, width, 1)
    if scale >= 1:
        return width, height
    return max(2, round(width * scale) // 2 * 2), max(2, round(height * scale) // 2 * 2)


def _filters(rotation: int, width: int, height: int) -> list[tuple[str, str]]:
    """decord's filter chain (src/video/ffmpeg/threaded_decoder.cc), flags spelled out: bilinear
    is libavfilter 7's default for `scale`, and newer FFmpeg defaults to bicubic."""
    turns = {90: ["1"], 180: ["1", "1"], 270: ["2"]}.get(rotation, [])
    return [("transpose", t) for t in turns] + [("scale", f"{width}:{height}:flags=bilinear")]


@dataclass(frozen=True)
class Windows:
    """Captioning a video in windows: [start, start + length_s) for start = 0, stride_s, 2 x stride_s,
    ... while start < the duration, each cut at the duration; a trailing window shorter than min_s
    is skipped. Frame i sits at i / fps seconds (the time the processor gives it)."""

    length_s: float
    stride_s: float
    min_s: float = 1.0

    def spans(self, total: int, rate: float) -> list[tuple[int, int, float, float]]:
        """(first frame, end frame, start s, end s) of each window of a video of `total` frames at
        `rate` frames a second: the frames i with start <= i / rate < end."""
        duration, out, k = total / rate, [], 0
        while (start := k * self.stride_s) < duration:
            k += 1
            end = min(start + self.length_s, duration)
            if end - start < self.min_s:
                continue
            first, last = math.ceil(start * rate - 1e-6), min(total, math.ceil(end * rate - 1e-6))
            if last > first:
                out.append((first, last, start, end))
        return out


@dataclass(frozen=True)
class Clip:
    """Sampled frames of a clip of a video (the whole of it, or a window) and the metadata the
    processor gets for it: the clip as a video of its own, its frames and times counted from 0."""

    frames: np.ndarray
    info: VideoInfo
    start_s: float
    end_s: float


def frame_rate(avg_fps: float) -> float:
    """The rate frames are placed in time by: the container's, else 24 (what processors assume)."""
    return avg_fps if avg_fps > 0 else 24.0


def decode_clips(
    data: bytes | VideoSource,
    num_frames: int = 8,
    max_side: int = 448,
    fps: float | None = None,
    max_frames: int = 64,
    windows: Windows | None = None,
) -> list[Clip]:
    """Decode a video once and sample frames per clip: the whole video, or each of its `windows`.
    Within a clip: `num_frames` evenly spaced frames, or with `fps` set, its duration x fps of them
    (1..max_frames)."""
    source = data if isinstance(data, VideoSource) else VideoSource(data=data)
    if not source.nbytes:
        raise ValueError("empty object (0 bytes)")
    name = decoder()
    if source.for_decord() is None:  # a streamed object: PyAV gives decord's frames
        name = "pyav"
    width, height = probe(source)
    spans: list[tuple[int, int, float, float, list[int]]] = []

    def plan(total: int, avg_fps: float) -> list[int]:
        if total <= 0:
            raise ValueError("the video has no frames")
        rate = frame_rate(avg_fps)
        cuts = windows.spans(total, rate) if windows else [(0, total, 0.0, total / rate)]
        if not cuts:
            raise ValueError(
                f"the video lasts {total / rate:.3f} s: no window of at least min_window_s={windows.min_s} s in it"
            )
        for first, last, start, end in cuts:
            count = num_frames
            if fps is not None:
                duration = (last - first) / max(avg_fps, 1e-6)
                count = max(1, min(max_frames, int(duration * fps)))
            spans.append((first, last, start, end, [first + i for i in sample_indices(last - first, count)]))
        return sorted({i for *_, indices in spans for i in indices})

    decode = _decode_decord if name == "decord" else _decode_pyav
    frames, info = decode(source, width, height, max_side, plan)
    if len(spans) == 1 and list(info.indices) == spans[0][4]:  # the whole video: no copy
        return [Clip(frames, info, spans[0][2], spans[0][3])]
    where = {i: k for k, i in enumerate(info.indices)}
    return [
        Clip(
            frames[[where[i] for i in indices]],
            VideoInfo(last - first, info.fps, tuple(i - first for i in indices)),
            start,
            end,
        )
        for first, last, start, end, indices in spans
    ]


def decode_video(
    data: bytes | VideoSource, num_frames: int = 8, max_side: int = 448, fps: float | None = None, max_frames: int = 64
) -> tuple[np.ndarray, VideoInfo]:
    """Decode a video (bytes or a `VideoSource`) and sample frames: uint8 [T, H, W, 3], and where they
    sit in the source. `num_frames` evenly spaced frames, or with `fps` set, duration x fps of them
    (1..max_frames)."""
    (clip,) = decode_clips(data, num_frames, max_side, fps, max_frames)
    return clip.frames, clip.info


def sample_frames(
    data: bytes, num_frames: int = 8, max_side: int = 448, fps: float | None = None, max_frames: int = 64
) -> np.ndarray:
    """Decode video bytes and sample frames: uint8 [T, H, W, 3] (`decode_video` without the VideoInfo)."""
    return decode_video(data, num_frames, max_side, fps, max_frames)[0]


def _avg_fps(value: float | None) -> float:
    value = float(value or 0.0)
    return value if math.isfinite(value) and value > 0 else 0.0


def _decode_decord(source: VideoSource, width: int, height: int, max_side: int, plan) -> tuple[np.ndarray, VideoInfo]:
    import decord

    size = {}
    if max(width, height) > max_side:  # decode straight to the smaller size: 4K frames are never converted whole
        out_width, out_height = _output_size(width, height, _first_frame_rotation(source), max_side)
        size = dict(width=out_width, height=out_height)  # decord wants the size after its rotation
    try:
        reader = decord.VideoReader(source.for_decord(), num_threads=1, **size)
        total, avg_fps = len(reader), _avg_fps(reader.get_avg_fps())
        indices = plan(total, avg_fps)
        # Only the sampled frames are kept; memory is bounded by count x the scaled frame size.
        frames = reader.get_batch(indices).asnumpy()
    except ValueError:
        raise
    except Exception as err:  # decord's own errors: the reason without source paths or quoted bytes
        raise ValueError(f"video could not be decoded: {_decord_message(err)}") from None
    return frames, VideoInfo(total, avg_fps, tuple(indices))


def _decord_message(err: Exception) -> str:
    """decord's errors start with a source location and may quote the input: keep the reason only."""
    text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
    return text[:300]


def _first_frame_rotation(source: VideoSource) -> int:
    """The rotation decord will apply. PyAV shows the display matrix on decoded frames only, so this
    decodes the first frame; 0 if none decodes (decord then reports why)."""
    import av

    try:
        with source.open() as raw, av.open(raw, mode="r") as container:
            stream = _video_stream(container)
            stream.codec_context.thread_count = 1
            for frame in container.decode(stream):
                return _clockwise(frame.rotation)
    except av.error.FFmpegError:
        pass
    return 0


def _decode_pyav(source: VideoSource, width: int, height: int, max_side: int, plan) -> tuple[np.ndarray, VideoInfo]:
    """Pass 1 reads the packets (the frame count as decord counts, their times and keyframes); pass
    2 decodes the sampled frames, by whichever decodes fewer frames: one sequential pass up to the
    last sampled frame, or a seek to the keyframe before each sampled frame (frames of one GOP in
    one go). Only the sampled frames are converted and kept."""
    import av

    try:
        with source.open() as raw, av.open(raw, mode="r") as container:  # pass 1: demux only
            stream = _video_stream(container)
            avg_fps = _avg_fps(stream.average_rate)
            packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if not _is_flush(p)]
        indices = plan(len(packets), avg_fps)
        groups = _seek_groups(packets, indices)
        frames = _sampled_by_seeking(source, groups, indices, width, height, max_side) if groups else None
        if frames is None:  # one pass is cheaper, or a seek did not land where the packets said
            with source.open() as raw, av.open(raw, mode="r") as container:
                stream = _video_stream(container)
                stream.codec_context.thread_count = 1
                rgb = _Rgb(stream.time_base, len(indices), width, height, max_side)
                _sampled_in_one_pass(container.decode(stream), indices, rgb)
                frames = rgb.out
    except av.error.FFmpegError as err:
        raise ValueError(f"video could not be decoded: {_reason(err)}") from None
    return frames, VideoInfo(len(packets), avg_fps, tuple(indices))


SEEK_GAIN = 2.0  # seek only when it decodes this many times fewer frames than one pass


def _seek_groups(packets: list[tuple[int | None, bool]], indices: list[int]) -> list[tuple[int, list[int]]] | None:
    """Where seeking pays: [(a keyframe's time, the times of the sampled frames in its GOP)], or
    None when one sequential pass decodes fewer frames (or the packets' times cannot place frames)."""
    times = [pts for pts, _ in packets]
    if not indices or any(t is None for t in times) or len(set(times)) != len(times):
        return None
    order = sorted(times)  # frame i of the presentation is the packet with the i-th time
    keys = sorted(pts for pts, key in packets if key)
    if not keys or keys[0] != order[0]:
        return None
    groups: dict[int, list[int]] = {}
    for i in sorted(set(indices)):
        groups.setdefault(keys[bisect.bisect_right(keys, order[i]) - 1], []).append(i)
    decoded = sum(group[-1] - bisect.bisect_left(order, key) + 1 for key, group in groups.items())
    if decoded * SEEK_GAIN > max(indices) + 1:
        return None
    return [(key, [order[i] for i in group]) for key, group in sorted(groups.items())]


def _sampled_by_seeking(source: VideoSource, groups, indices: list[int], width: int, height: int, max_side: int):
    """The sampled frames, each GOP's decoded after a seek to its keyframe; None if a frame's time
    is not where the packets put it (the caller then decodes in one pass)."""
    import av

    time_of = dict(zip(sorted(set(indices)), sorted(t for _, group in groups for t in group)))
    position: dict[int, list[int]] = {}  # a sampled frame's time -> its places in the output
    for k, i in enumerate(indices):
        position.setdefault(time_of[i], []).append(k)
    with source.open() as raw, av.open(raw, mode="r") as container:
        stream = _video_stream(container)
        stream.codec_context.thread_count = 1
        rgb = _Rgb(stream.time_base, len(indices), width, height, max_side)
        for key, wanted in groups:
            container.seek(key, stream=stream, backward=True, any_frame=False)
            pending = list(wanted)
            for frame in container.decode(stream):
                if frame.pts is None or frame.pts > pending[0]:
                    return None
                if frame.pts == pending[0]:
                    rgb.put(frame, position[pending.pop(0)])
                    if not pending:
                        break
            if pending:
                return None
        return rgb.out


def _sampled_in_one_pass(decoded, indices: list[int], rgb) -> None:
    """Frames in presentation order -> the sampled ones, in one sequential pass."""
    wanted: dict[int, list[int]] = {}
    for k, i in enumerate(indices):
        wanted.setdefault(i, []).append(k)
    for i, frame in enumerate(decoded):
        if i in wanted:
            rgb.put(frame, wanted.pop(i))
            if not wanted:
                return
    decoded_count = len(indices) - sum(len(p) for p in wanted.values())
    raise ValueError(
        f"video could not be decoded: frame {min(wanted)} never came out of the decoder "
        f"({decoded_count} of {len(indices)} sampled frames decoded)"
    )


class _Rgb:
    """The sampled frames in RGB, uint8 [T, H, W, 3], through decord's filter graph (built from the
    first frame, which carries the display rotation)."""

    def __init__(self, time_base, count: int, width: int, height: int, max_side: int) -> None:
        self.time_base, self.count, self.size, self.max_side = time_base, count, (width, height), max_side
        self.graph, self.out = None, None

    def put(self, frame, positions: list[int]) -> None:
        if self.graph is None:
            rotation = _clockwise(frame.rotation)
            out_width, out_height = _output_size(*self.size, rotation, self.max_side)
            self.graph = _rgb_graph(frame, self.time_base, _filters(rotation, out_width, out_height))
            self.out = np.empty((self.count, out_height, out_width, 3), dtype=np.uint8)
        self.graph.vpush(frame)
        self.out[positions] = self.graph.vpull().to_ndarray()


def _is_flush(packet) -> bool:
    """PyAV ends demuxing with an empty packet per stream (to flush decoders): not a frame."""
    return packet.size == 0 and packet.pts is None and packet.dts is None


def _rgb_graph(frame, time_base, filters: list[tuple[str, str]]):
    """The filter graph decord builds: frames in, the chain, RGB24 out, one thread."""
    import av

    graph = av.filter.Graph()
    graph.threads = 1
    nodes = [graph.add_buffer(width=frame.width, height=frame.height, format=frame.format, time_base=time_base)]
    nodes += [graph.add(name, args) for name, args in filters]
    nodes += [graph.add("format", "rgb24"), graph.add("buffersink")]  # decord asks its sink for RGB24
    graph.link_nodes(*nodes).configure()
    return graph


DECODED_SCHEMA = pa.schema(
    [
        ("video_uri", pa.string()),
        ("etag", pa.string()),
        ("size", pa.int64()),
        ("clip_start_s", pa.float64()),
        ("clip_end_s", pa.float64()),
        ("shard_uri", pa.string()),
        ("source_meta", pa.string()),
        ("object_rows", pa.int64()),
        ("frames", pa.binary()),
        ("frames_shape", pa.list_(pa.int64())),
        ("error", pa.string()),
        ("error_kind", pa.string()),
        ("video_total_frames", pa.int64()),
        ("video_fps", pa.float64()),
        ("frame_indices", pa.list_(pa.int64())),
        ("decode_s", pa.float64()),
    ]
)
BLOCK_ROWS = 8  # decoded rows per output block of a decode task
SIDECAR_BYTES = 1 << 20  # the most of a sample's .json kept as source_meta


@dataclass(frozen=True)
class Sampling:
    """How a decode task samples: the job's frame settings, the largest video it reads, its windows
    and which members of a shard are videos."""

    num_frames: int = 8
    max_side: int = 448
    fps: float | None = None
    max_frames: int = 64
    max_bytes: int = 2 << 30
    windows: Windows | None = None
    include: tuple[str, ...] = VIDEO_PATTERNS


def _row(video_uri: str, etag: str, size: int, **fields) -> dict:
    """A decoded row with nothing decoded yet."""
    row = dict(video_uri=video_uri, etag=etag, size=int(size), clip_start_s=0.0, clip_end_s=0.0, shard_uri="")
    row.update(source_meta="", object_rows=0, frames=b"", frames_shape=[0, 0, 0, 0], error="", error_kind="")
    row.update(video_total_frames=0, video_fps=0.0, frame_indices=[], decode_s=0.0)
    row.update(fields)
    return row


def _failed(row: dict, err: BaseException, stage: str = "decode failed") -> dict:
    row["error"] = f"{stage}: {type(err).__name__}: {err}"[:2000]
    row["error_kind"] = "transient" if getattr(err, "transient", False) else "permanent"
    return row


def _video_rows(base: dict, source, sampling: Sampling, skip: set[str], seen: list[int]) -> Iterator[dict]:
    """One video's rows: a row per clip (the whole video, or each window) not in `skip`, or one error
    row. `source()` gives its VideoSource; `seen[0]` counts every row the video makes, skipped too."""
    started = time.perf_counter()
    try:
        if base["size"] > sampling.max_bytes:
            raise ValueError(f"object is {base['size']} bytes, over max_video_bytes={sampling.max_bytes}")
        s = sampling
        clips = decode_clips(source(), s.num_frames, s.max_side, s.fps, s.max_frames, s.windows)
    except Exception as err:  # any failure on one input must become that input's error row
        seen[0] += 1
        if row_key(base["video_uri"], 0.0) not in skip:
            yield _failed(dict(base, decode_s=time.perf_counter() - started), err)
        return
    seen[0] += len(clips)
    kept = [c for c in clips if row_key(base["video_uri"], c.start_s) not in skip]
    seconds = (time.perf_counter() - started) / max(1, len(kept))
    # A video of its own knows its row count now; a shard's member leaves it to the shard's last row.
    count = 0 if base["shard_uri"] else len(clips)
    for clip in kept:
        yield dict(
            base,
            object_rows=count,
            clip_start_s=clip.start_s,
            clip_end_s=clip.end_s,
            frames=clip.frames.tobytes(),
            frames_shape=list(clip.frames.shape),
            video_total_frames=clip.info.total_frames,
            video_fps=clip.info.fps,
            frame_indices=list(clip.info.indices),
            decode_s=seconds,
        )


def _sample_key(name: str) -> tuple[str, str]:
    """WebDataset's (sample key, extension) of a member: the key is its path up to the first "." of
    its base name (`a/000123.mp4` and `a/000123.json` are one sample, `a/000123`)."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (extension if dot else "")


class ShardBroken(ValueError):
    """A shard that stops being a readable tar archive partway: truncated, or not a tar at all."""


def _shard_samples(uri: str, settings: S3Settings, size: int, sampling: Sampling) -> Iterator[tuple[list, str]]:
    """A shard's samples in order, read as a stream (one sample's members in memory at a time):
    ([(member name, member size, its bytes, or None when over max_video_bytes)], the sample's .json
    text). Raises ShardBroken where the archive breaks, after the samples complete before it."""
    import tarfile

    sample: list = []
    meta, key, current, complete = "", None, None, 0
    try:
        with open_object(uri, settings, size or None) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                current = member
                if not member.isfile():
                    continue
                member_key, extension = _sample_key(member.name)
                if member_key != key:
                    if sample:
                        yield sample, meta
                    sample, meta, key = [], "", member_key
                if name_matches(member.name, sampling.include):
                    small = member.size <= sampling.max_bytes
                    sample.append((member.name, member.size, tar.extractfile(member).read() if small else None))
                elif extension.lower() == "json":
                    meta = tar.extractfile(member).read(SIDECAR_BYTES).decode("utf-8", errors="replace")
                complete += 1
                current = None
    except (tarfile.TarError, EOFError) as err:
        if sample:
            yield sample, meta
        where = (
            f"inside member {current.name!r} (its header at byte {current.offset})"
            if current is not None
            else f"after {complete} complete members"
        )
        raise ShardBroken(
            f"not a readable tar archive: it breaks {where} ({err}); the members before it have rows"
        ) from None
    if sample:
        yield sample, meta


def _shard_rows(
    shard: dict, settings: S3Settings, sampling: Sampling, skip: set[str], seen: list[int]
) -> Iterator[dict]:
    """A WebDataset shard's rows: one per video member (per window with windows), each member a
    video decoded from memory; where the shard breaks, one error row for the shard itself."""
    uri, etag = shard["video_uri"], shard["etag"]
    videos = 0
    samples = _shard_samples(uri, settings, int(shard["size"]), sampling)
    while True:
        started = time.perf_counter()
        try:
            members, meta = next(samples)
        except StopIteration:
            break
        except Exception as err:  # a broken archive, or storage that failed for good mid-shard
            seen[0] += 1
            if row_key(uri, 0.0) not in skip:
                yield _failed(
                    _row(uri, etag, shard["size"], shard_uri=uri, decode_s=time.perf_counter() - started), err
                )
            return
        for name, size, data in members:
            videos += 1
            if sampling.windows is None and row_key(f"{uri}#{name}", 0.0) in skip:  # its row is written
                seen[0] += 1
                continue
            base = _row(f"{uri}#{name}", etag, size, shard_uri=uri, source_meta=meta)
            yield from _video_rows(base, lambda data=data: VideoSource(data=data), sampling, skip, seen)
    if not videos:
        seen[0] += 1
        if row_key(uri, 0.0) not in skip:
            wanted = ", ".join(sampling.include)
            yield _row(
                uri,
                etag,
                shard["size"],
                shard_uri=uri,
                error=f"decode failed: the shard holds no member matching {wanted}",
                error_kind="permanent",
            )


def object_rows(row: dict, settings: S3Settings, sampling: Sampling) -> Iterator[dict]:
    """A listed object (video_uri, etag, size; `skip`: keys of its rows already written) -> its
    decoded rows, the last carrying `object_rows`, the count of rows the object makes in all."""
    faults.maybe_crash("decode", [row])
    skip, seen = set(row.get("skip") or ()), [0]
    if is_shard(row["video_uri"]):
        rows = _shard_rows(row, settings, sampling, skip, seen)
    else:
        base = _row(row["video_uri"], row["etag"], row["size"])
        rows = _video_rows(base, lambda: VideoSource.of(row["video_uri"], settings, row["size"]), sampling, skip, seen)
    last = None
    for r in rows:
        if last is not None:
            yield last
        last = r
    if last is not None:
        last["object_rows"] = seen[0]
        yield last


def decode_rows(
    rows: list[dict], settings: S3Settings, sampling: Sampling, ledger=None, max_crashes: int = 3
) -> Iterator[dict]:
    """The decoded rows of a block of listed objects (one ledger call each way for the block; see
    pipeline/ledger.py), as they come."""
    guard = Guard(ledger, "decode", max_crashes)

    def give_up(r: dict, crashes: int) -> Iterator[dict]:
        yield _row(
            r["video_uri"],
            r["etag"],
            r["size"],
            shard_uri=r["video_uri"] if is_shard(r["video_uri"]) else "",
            object_rows=1,
            error=guard.message(crashes),
            error_kind="permanent",
        )

    yield from guard.stream(rows, lambda r: object_rows(r, settings, sampling), give_up)


def decode_row(row: dict, settings: S3Settings, sampling: Sampling | None = None) -> dict:
    """The first decoded row of one listed object (a video's, without windows: its only row)."""
    return next(decode_rows([row], settings, sampling or Sampling()))


def decode_block(batch: pa.Table, settings: S3Settings, sampling: Sampling, ledger=None, max_crashes: int = 3):
    """Ray Data map_batches over listed objects (pyarrow blocks) -> decoded rows, BLOCK_ROWS a block."""
    out: list[dict] = []
    for row in decode_rows(batch.to_pylist(), settings, sampling, ledger, max_crashes):
        out.append(row)
        if len(out) == BLOCK_ROWS:
            yield pa.Table.from_pylist(out, schema=DECODED_SCHEMA)
            out = []
    if out:
        yield pa.Table.from_pylist(out, schema=DECODED_SCHEMA)


def frames_of(row: dict) -> np.ndarray:
    # A writable copy: torch refuses to wrap read-only buffers without a warning.
    return np.frombuffer(row["frames"], dtype=np.uint8).reshape(row["frames_shape"]).copy()


def video_metadata(info: VideoInfo) -> dict:
    """Keyword arguments for transformers' VideoMetadata, so that processors place the frames in
    time. fps is None when the container gave none (processors then assume 24)."""
    return {
        "total_num_frames": int(info.total_frames),
        "fps": float(info.fps) if info.fps > 0 else None,
        "frames_indices": [int(i) for i in info.indices],
    }


def video_metadata_of(row: dict) -> dict:
    """`video_metadata` of a decoded row."""
    info = VideoInfo(int(row["video_total_frames"]), float(row["video_fps"]), tuple(row["frame_indices"]))
    return video_metadata(info)
