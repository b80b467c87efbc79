"""Videos read where they lie: a local file from disk, an S3 object as a stream of ranged reads
(real S3 protocol, moto). The frames, their metadata and the errors are those of decoding the same
bytes from memory, for the demo clips and every hostile input, with either decoder."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pipeline import decode, storage
from pipeline.decode import Sampling, VideoSource, decode_row, decode_video
from pipeline.storage import S3Settings, open_object
from tests.pipeline.common import new_bucket, s3_client
from tests.pipeline.hostile import generate
from tests.pipeline.test_decode import DECODERS

BLOCK = 64 << 10  # small ranged reads, so every clip takes many


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("hostile"))


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(storage, "STREAM_BLOCK", BLOCK)


def _outcome(source, decoder: str):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(decode.DECODER_ENV, decoder)
        try:
            frames, info = decode_video(source, num_frames=6, max_side=224)
        except ValueError as err:
            return str(err)
        return frames.tobytes(), frames.shape, info


def test_a_ranged_object_reads_like_its_bytes(s3_server, small_blocks):
    bucket = new_bucket(s3_server)
    data = np.random.default_rng(1).integers(0, 256, 5 * BLOCK + 123, dtype=np.uint8).tobytes()
    s3_client(s3_server).put_object(Bucket=bucket, Key="blob.bin", Body=data)
    rng = random.Random(0)
    with open_object(f"s3://{bucket}/blob.bin", S3Settings(endpoint=s3_server)) as stream:
        assert stream.read() == data
        for _ in range(50):
            start, count = rng.randrange(len(data) + 10), rng.randrange(3 * BLOCK)
            stream.seek(start)
            assert stream.read(count) == data[start : start + count]
        stream.seek(-7, 2)
        assert stream.read() == data[-7:] and stream.tell() == len(data)


@pytest.mark.parametrize("decoder", DECODERS)
def test_streamed_and_local_videos_decode_as_their_bytes(s3_server, hostile, tmp_path, small_blocks, decoder):
    bucket, settings = new_bucket(s3_server), S3Settings(endpoint=s3_server)
    client = s3_client(s3_server)
    for i, case in enumerate(hostile):
        path = tmp_path / f"{i}.bin"
        path.write_bytes(case.data)
        client.put_object(Bucket=bucket, Key=f"{i}.bin", Body=case.data)
        in_memory = _outcome(case.data, decoder)
        local = _outcome(VideoSource.of(str(path), settings), decoder)
        streamed = _outcome(VideoSource(uri=f"s3://{bucket}/{i}.bin", size=len(case.data), settings=settings), decoder)
        assert local == in_memory, case.name
        assert streamed == in_memory, case.name  # PyAV from ranged reads gives the chosen decoder's frames
        if case.error is not None:
            assert case.error in in_memory, case.name


def test_an_object_over_the_stream_size_is_never_read_whole(s3_server, hostile, small_blocks, monkeypatch):
    """A listed object larger than STREAM_ABOVE is decoded from ranged reads: no GET of the whole
    object, and the row is the one decoding its bytes gives."""
    good = next(c for c in hostile if c.name == "portrait.mp4")
    bucket, settings = new_bucket(s3_server), S3Settings(endpoint=s3_server)
    s3_client(s3_server).put_object(Bucket=bucket, Key="big.mp4", Body=good.data)
    monkeypatch.setattr(decode, "STREAM_ABOVE", len(good.data) - 1)
    ranges: list[str | None] = []
    real = storage._get
    monkeypatch.setattr(
        storage, "_get", lambda uri, s, first=None, last=None: ranges.append(first) or real(uri, s, first, last)
    )
    uri = f"s3://{bucket}/big.mp4"
    row = decode_row({"video_uri": uri, "size": len(good.data), "etag": "e"}, settings, Sampling(6, 224))
    assert row["error"] == "" and ranges and None not in ranges  # every read was ranged
    frames, info = decode_video(good.data, num_frames=6, max_side=224)
    assert row["frames"] == frames.tobytes() and row["frame_indices"] == list(info.indices)
