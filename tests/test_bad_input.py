"""Bad input against the main pipeline's stages: a corpus of malformed messages per input topic and
a fuzz run of random and mutated messages. Every bad message must be refused with a SchemaError
(the exactly-once task turns it into a dead letter with its reason); nothing else may escape (an
escaping exception fails the bundle and would replay forever); good messages around bad ones are
processed normally; duplicates and reordering are handled by sequence number."""

from __future__ import annotations

import dataclasses
import random
import time

import numpy as np
import pyarrow as pa
import pytest

from streamvqa.media import encode_jpeg
from streamvqa.operators.io.records import KafkaRecord
from streamvqa.pipelines.video_qa.graph import StageFactories
from streamvqa.schemas import (
    MAX_TIME_US,
    AudioChunk,
    Frame,
    Query,
    SchemaError,
    SpeechNote,
    VisualNote,
    decode,
    encode,
    make_dead_letter,
)

pytestmark = [pytest.mark.stack, pytest.mark.slow]
SID = "fuzz-cam"


def raw(record, **changes) -> bytes:
    """An Arrow message of ``record``'s type with fields changed, bypassing validation."""
    cls = type(record)
    row = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    row.update(changes)
    row = {k: list(v) if isinstance(v, tuple) else v for k, v in row.items()}
    schema = cls.SCHEMA
    if "schema_version" in changes:
        schema = schema.with_metadata(
            {**schema.metadata, b"streamvqa.version": str(changes["schema_version"]).encode()}
        )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(pa.RecordBatch.from_pylist([row], schema=schema))
    return sink.getvalue().to_pybytes()


def rec(topic: str, value: bytes, offset: int, key: bytes = SID.encode()) -> KafkaRecord:
    return KafkaRecord(topic, 0, offset, key, value, int(time.time() * 1000))


@pytest.fixture(scope="module")
def stages(stack_settings):
    f = StageFactories(stack_settings)
    return {"frames": f.frames(), "audio": f.audio(), "queries": f.queries(), "memory": f.memory()}


def _jpeg(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_jpeg(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


GOOD_FRAME = Frame(stream_id=SID, seq=0, pts_us=0, codec="jpeg", width=64, height=48, payload=_jpeg(0))
GOOD_AUDIO = AudioChunk(
    stream_id=SID,
    seq=0,
    pts_us=0,
    sample_rate=16_000,
    channels=1,
    sample_format="f32le",
    payload=np.zeros(16_000, "<f4").tobytes(),
)
GOOD_QUERY = Query(query_id="q-1", stream_id=SID, text="What happened?", asked_at_us=1)


def corpus() -> dict[str, list[tuple]]:
    """topic -> (what, message, expected reason[, the field it must name])."""
    jpeg = GOOD_FRAME.payload
    nan_audio = np.zeros(1600, "<f4")
    nan_audio[7] = np.nan
    inf_audio = np.zeros(1600, "<f4")
    inf_audio[3] = np.inf
    whole = encode(GOOD_FRAME)
    return {
        "frames": [
            ("truncated message", whole[: len(whole) // 2], "truncated"),
            ("not Arrow", b"\x00\x01garbage" * 10, "malformed"),
            ("truncated JPEG", raw(GOOD_FRAME, payload=jpeg[: len(jpeg) // 2]), "invalid_field"),
            (
                "corrupt JPEG",
                raw(GOOD_FRAME, payload=b"\xff\xd8" + bytes(200) + b"\xff\xd9"),
                "invalid_field",
            ),
            ("wrong schema version", raw(GOOD_FRAME, schema_version=2), "wrong_version"),
            ("absurd dimensions", raw(GOOD_FRAME, width=100_000, height=1), "invalid_field"),
            ("size not the JPEG's", raw(GOOD_FRAME, width=640, height=480), "invalid_field"),
            (
                "oversized payload",
                raw(GOOD_FRAME, payload=b"\xff\xd8" + bytes(17 << 20) + b"\xff\xd9"),
                "oversized",
            ),
            ("rgb24 of the wrong length", raw(GOOD_FRAME, codec="rgb24", payload=bytes(10)), "invalid_field"),
            ("negative seq", raw(GOOD_FRAME, seq=-5), "invalid_field"),
            ("an audio chunk on the frames topic", encode(GOOD_AUDIO), "wrong_type"),
            (
                "key of another stream",
                encode(dataclasses.replace(GOOD_FRAME, stream_id="other")),
                "invalid_field",
            ),
            ("pts at the end of int64", raw(GOOD_FRAME, pts_us=2**63 - 1), "invalid_field", "pts_us"),
        ],
        "audio": [
            ("NaN samples", raw(GOOD_AUDIO, payload=nan_audio.tobytes()), "invalid_field"),
            ("inf samples", raw(GOOD_AUDIO, payload=inf_audio.tobytes()), "invalid_field"),
            ("8 kHz audio", encode(dataclasses.replace(GOOD_AUDIO, sample_rate=8000)), "invalid_field"),
            ("odd byte count", raw(GOOD_AUDIO, payload=bytes(7)), "invalid_field"),
            ("wrong schema version", raw(GOOD_AUDIO, schema_version=9), "wrong_version"),
            ("two minutes in one chunk", raw(GOOD_AUDIO, payload=bytes(4 * 16_000 * 120)), "invalid_field"),
            # refused when decoded, naming pts_us, not later when pts + duration overflows a note's end_us
            ("pts at the end of int64", raw(GOOD_AUDIO, pts_us=2**63 - 1), "invalid_field", "pts_us"),
            ("ends after MAX_TIME_US", raw(GOOD_AUDIO, pts_us=MAX_TIME_US - 1), "invalid_field", "pts_us"),
        ],
        "queries": [
            ("empty question", raw(GOOD_QUERY, text=""), "invalid_field"),
            ("blank question", raw(GOOD_QUERY, text="   \n"), "invalid_field"),
            ("huge question", raw(GOOD_QUERY, text="why " * 5000), "invalid_field"),
            (
                "image that does not decode",
                raw(GOOD_QUERY, image=b"\xff\xd8xx\xff\xd9", image_codec="jpeg"),
                "invalid_field",
            ),
            ("image without codec", raw(GOOD_QUERY, image=_jpeg(1), image_codec=None), "invalid_field"),
            ("bad query id", raw(GOOD_QUERY, query_id="../../etc"), "invalid_field"),
            ("asked at before 1970", raw(GOOD_QUERY, asked_at_us=-1), "invalid_field"),
            ("asked at int64's end", raw(GOOD_QUERY, asked_at_us=2**63 - 1), "invalid_field", "asked_at_us"),
            ("wrong schema version", raw(GOOD_QUERY, schema_version=3), "wrong_version"),
            ("a frame on the queries topic", encode(GOOD_FRAME), "wrong_type"),
            (
                "about another stream than its key",
                encode(dataclasses.replace(GOOD_QUERY, stream_id="victim")),
                "invalid_field",
            ),
        ],
        "memory": [
            ("a frame on the memory topic", encode(GOOD_FRAME), "wrong_type"),
            # a record without a stream id: refused at once, not an AttributeError retried as a failure
            (
                "a dead letter on the memory topic",
                encode(
                    make_dead_letter(
                        SchemaError("x"),
                        source_topic="t",
                        source_partition=0,
                        source_offset=0,
                        payload=b"x",
                        key=SID.encode(),
                    )
                ),
                "wrong_type",
            ),
            (
                "a note of another stream",
                encode(SpeechNote(stream_id="victim", seq=0, start_us=0, end_us=1, wall_us=1, text="secret")),
                "wrong_type",
            ),
            (
                "note with NaN feature",
                raw(
                    VisualNote(
                        stream_id=SID,
                        seq=0,
                        pts_us=0,
                        wall_us=1,
                        tier="clear",
                        reason="first",
                        tokens=1,
                        memory_tokens=1,
                        cached_fraction=0.0,
                        feature=(0.0,),
                        keyframe_key="",
                        content_hash="ab",
                        encode_ms=0.0,
                    ),
                    feature=[float("nan")],
                ),
                "invalid_field",
            ),
            (
                "a transcript claiming open speech",
                raw(
                    SpeechNote(stream_id=SID, seq=0, start_us=0, end_us=2, wall_us=1, text="hi"),
                    open_since_us=1,
                ),
                "invalid_field",
            ),
            (
                "a mark open after its end",
                raw(
                    SpeechNote(stream_id=SID, seq=0, start_us=0, end_us=2, wall_us=1, text=""),
                    open_since_us=3,
                ),
                "invalid_field",
            ),
            ("not Arrow", b"\xff" * 64, "malformed"),
        ],
    }


def test_corpus_every_bad_message_is_refused_with_its_reason(stages) -> None:
    for topic, cases in corpus().items():
        stage = stages[topic]
        state = stage.initial_state(SID)
        for what, value, reason, *field in cases:
            with pytest.raises(SchemaError) as info:
                stage.process(state, rec(topic, value, 0))
                pytest.fail(f"{topic}: {what} was accepted")
            assert info.value.reason == reason, (topic, what, info.value)
            if field:
                assert info.value.field == field[0], (topic, what, info.value)


def test_good_messages_around_bad_ones_and_sequence_numbers(stages) -> None:
    frames = stages["frames"]
    state = frames.initial_state(SID)
    noted = []
    bad = corpus()["frames"]
    seqs = [0, 1, 1, 2, 0, 4, 3, 5]  # a duplicate, a replay of 0, 3 after 4 (late: dropped)
    for offset, seq in enumerate(seqs):
        good = dataclasses.replace(GOOD_FRAME, seq=seq, pts_us=seq * 500_000, payload=_jpeg(seq))
        state, out = frames.process(state, rec("frames", encode(good), 2 * offset))
        noted += [decode(o.value, VisualNote).seq for o in out]
        with pytest.raises(SchemaError):  # a bad message between every two good ones changes nothing
            frames.process(state, rec("frames", bad[offset % len(bad)][1], 2 * offset + 1))
    assert noted == [0, 1, 2, 4, 5]
    assert state.last_seq == 5 and state.frames == 5


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:  # flip bytes
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        data = data[: rng.randrange(len(data))]
    elif kind == 2:  # splice random bytes in
        at = rng.randrange(len(data))
        data[at:at] = rng.randbytes(rng.randint(1, 64))
    else:  # overwrite a run
        at = rng.randrange(len(data))
        data[at : at + 16] = rng.randbytes(16)
    return bytes(data)


def test_fuzz_random_and_mutated_messages(stages) -> None:
    rng = random.Random(20261124)
    speech = SpeechNote(stream_id=SID, seq=1, start_us=0, end_us=1_000_000, wall_us=1, text="hello there")
    seeds = {
        "frames": [encode(dataclasses.replace(GOOD_FRAME, seq=i + 1, payload=_jpeg(i))) for i in range(4)],
        "audio": [encode(dataclasses.replace(GOOD_AUDIO, seq=i + 1)) for i in range(4)],
        "queries": [
            encode(GOOD_QUERY),
            encode(dataclasses.replace(GOOD_QUERY, image=_jpeg(3), image_codec="jpeg")),
        ],
        "memory": [encode(speech)],
    }
    counts = {"frames": 400, "audio": 600, "queries": 1000, "memory": 1000}
    refused = accepted = 0
    for topic, n in counts.items():
        stage, state = stages[topic], stages[topic].initial_state(SID)
        for i in range(n):
            value = (
                rng.randbytes(rng.randint(0, 300)) if i % 5 == 0 else _mutate(rng, rng.choice(seeds[topic]))
            )
            try:
                state, _ = stage.process(state, rec(topic, value, i))
                accepted += 1
            except SchemaError as err:
                assert err.reason and str(err)
                refused += 1
        # the stage still works on good input afterwards
        good = {
            "frames": encode(dataclasses.replace(GOOD_FRAME, seq=10**6, payload=_jpeg(99))),
            "audio": encode(dataclasses.replace(GOOD_AUDIO, seq=10**6, pts_us=10**9)),
            "queries": encode(dataclasses.replace(GOOD_QUERY, query_id="q-after")),
            "memory": encode(dataclasses.replace(speech, start_us=10**9, end_us=10**9 + 1)),
        }[topic]
        stage.process(state, rec(topic, good, n))
    assert refused + accepted == sum(counts.values()) and refused > 0.8 * sum(counts.values())


def test_a_memory_state_never_holds_another_streams_memory(stages) -> None:
    """Keys are namespaced by stream id and verified on read: a snapshot rewritten to point at
    another stream's KV memory, or a KV memory copied under another stream's key, is refused."""
    import json
    import struct

    from streamvqa.operators.kv import BlockMismatch

    memory = stages["memory"]
    victim = memory.initial_state("victim-1")
    victim.kv, victim.kv_version = memory.memory.open("victim-1"), 1
    blob = memory.encode_state(victim)
    magic = b"streamvqa.memory-stage/1"
    (n,) = struct.unpack_from("<I", blob, len(magic))
    head = json.loads(blob[len(magic) + 4 : len(magic) + 4 + n])

    def forged(**changes) -> bytes:
        raw = json.dumps({**head, **changes}).encode()
        return magic + struct.pack("<I", len(raw)) + raw + blob[len(magic) + 4 + n :]

    with pytest.raises(BlockMismatch):  # the attacker's state naming the victim's memory
        memory.decode_state(forged(stream_id="attacker-1"))
    # the victim's memory copied under the attacker's prefix: its blocks say whose they are
    stolen = f"streams/attacker-1/memory/kv-state/{head['kv_key'].rsplit('/', 1)[1]}"
    memory.objects.put(stolen, memory.objects.get(head["kv_key"]))
    with pytest.raises(BlockMismatch):
        memory.decode_state(forged(stream_id="attacker-1", kv_key=stolen))
    assert memory.decode_state(blob).kv.stream_id == "victim-1"  # the real one still reads
