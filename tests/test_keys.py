"""Object keys: namespaced by stream id, content-addressed, never crossing streams."""

from __future__ import annotations

import pytest

from streamvqa.storage.keys import content_hash, key_stream_id, object_key, stream_prefix, valid_stream_id


@pytest.mark.parametrize("good", ["cam-1", "a", "Studio_4.main", "x" * 128])
def test_valid_stream_ids(good: str) -> None:
    assert valid_stream_id(good)
    assert stream_prefix(good) == f"streams/{good}/"


@pytest.mark.parametrize("bad", ["", "../other", "a/b", "a..b", "cam\n", "-lead", "x" * 129, "é"])
def test_invalid_stream_ids_are_refused(bad: str) -> None:
    assert not valid_stream_id(bad)
    with pytest.raises(ValueError, match="invalid stream id"):
        stream_prefix(bad)


def test_object_key_carries_stream_and_content_hash() -> None:
    key = object_key("cam-1", "frames", "00000007", b"jpeg bytes")
    assert key == f"streams/cam-1/frames/00000007-{content_hash(b'jpeg bytes')[:16]}"
    assert key_stream_id(key) == "cam-1"
    assert object_key("cam-1", "frames", "00000007", b"other") != key
    with pytest.raises(ValueError):
        object_key("cam-1", "../cam-2", "x", b"")
    with pytest.raises(ValueError):
        key_stream_id("tasks/g/progress")
