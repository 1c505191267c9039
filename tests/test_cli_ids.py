"""Ids on the command line (issue #20, defect 5), against the real embedded broker.

Every command that takes a stream id (``produce --stream-id``, ``ask STREAM_ID``, ``answers --stream``)
checks it with the records' own rule before anything connects or is published: a bad id ends the
command with one ``error: ...`` line on stderr and exit code 2, no traceback. The commands run on
topics of the test alone (the settings' topics come from STREAMVQA_TOPICS__* variables).
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from streamvqa.cli import app
from streamvqa.schemas import InvalidField, encode
from tests.kafka_helpers import frame_bytes, private_topics, read_all

pytestmark = pytest.mark.stack

BAD_IDS = ["../x", "a/b", "", "-cam", "a..b", "cam 1", "x" * 129, "caméra"]


@pytest.fixture()
def cli_topics(stack_settings, monkeypatch):
    """(settings, endpoints) whose topics are the test's own, and the CLI's too."""
    settings, endpoints = private_topics(stack_settings, "cli-ids")
    for role, topic in settings.topics.names().items():
        monkeypatch.setenv(f"STREAMVQA_TOPICS__{role.upper()}", topic)
    return settings, endpoints


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _assert_refused(result, value: str, field: str = "stream_id") -> None:
    """Exit 2, one `error:` line on stderr naming the field and the id, nothing else, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught error
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77]  # long ids are cut in the message
    assert lines[0].startswith("error: ") and f"{field} {shown}" in lines[0], lines[0]
    assert "not a valid id" in lines[0]
    assert result.stdout == "" and "Traceback" not in result.output


def _send(settings, endpoints, topic: str, key: bytes, value: bytes) -> None:
    from streamvqa import connect

    producer = connect.producer(settings, endpoints)
    try:
        producer.send(topic, key=key, value=value).get(timeout=30)
    finally:
        producer.close()


def test_ask_with_an_invalid_stream_id_is_refused_in_one_line(cli_topics, stack_settings) -> None:
    # A message keyed "../x" (its record another stream's) used to make the stream look known, and the
    # question then died in an uncaught InvalidField traceback.
    settings, endpoints = cli_topics
    _send(settings, endpoints, settings.topics.frames, b"../x", frame_bytes("other", 0))
    result = _cli("ask", "--data-dir", str(stack_settings.data_dir), "--timeout", "1", "--", "../x", "what?")
    _assert_refused(result, "../x")
    assert read_all(settings, endpoints, settings.topics.queries, timeout_ms=500) == []  # nothing asked


def test_produce_with_an_invalid_stream_id_is_refused_and_sends_nothing(
    cli_topics, stack_settings, tmp_path
) -> None:
    # It used to resume "after" a message keyed "../x" of another stream, send nothing and exit 0.
    from PIL import Image

    settings, endpoints = cli_topics
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "0.png")
    _send(settings, endpoints, settings.topics.frames, b"../x", frame_bytes("other", 5))
    result = _cli(
        "produce", str(tmp_path), "--stream-id", "../x", "--data-dir", str(stack_settings.data_dir), "--quiet"
    )
    _assert_refused(result, "../x")
    assert "--stream-id" in result.stderr
    # nothing sent: the frames topic holds the forged message only
    assert len(read_all(settings, endpoints, settings.topics.frames, timeout_ms=500)) == 1


def test_answers_with_an_invalid_stream_is_refused(cli_topics, stack_settings) -> None:
    result = _cli(
        "answers", "--stream", "../x", "--idle-timeout", "1", "--data-dir", str(stack_settings.data_dir)
    )
    _assert_refused(result, "../x")
    assert "--stream" in result.stderr


@pytest.mark.parametrize("bad", BAD_IDS, ids=range(len(BAD_IDS)))
def test_every_id_taking_command_refuses_a_bad_id(cli_topics, stack_settings, tmp_path, bad: str) -> None:
    data = ["--data-dir", str(stack_settings.data_dir)]
    _assert_refused(_cli("ask", *data, "--timeout", "1", "--", bad, "what?"), bad)
    _assert_refused(_cli("produce", str(tmp_path), f"--stream-id={bad}", *data, "--quiet"), bad)
    _assert_refused(_cli("answers", f"--stream={bad}", "--idle-timeout", "1", *data), bad)


def test_valid_ids_still_get_through(cli_topics, stack_settings) -> None:
    settings, endpoints = cli_topics
    data = ["--data-dir", str(stack_settings.data_dir)]
    result = _cli("ask", *data, "--timeout", "1", "unknown-cam", "what?")
    # the id passed the check: the stream is unknown (exit 3, as before)
    assert result.exit_code == 3 and "unknown stream 'unknown-cam'" in result.stderr
    # a known stream and a blank question: refused in one line as well, nothing published
    _send(settings, endpoints, settings.topics.frames, b"known-cam", frame_bytes("known-cam", 0))
    result = _cli("ask", *data, "--timeout", "1", "known-cam", "   ")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr.splitlines() == ["error: text must not be empty or only whitespace"]
    assert read_all(settings, endpoints, settings.topics.queries, timeout_ms=500) == []
    result = _cli("answers", "--stream", "known-cam", "--idle-timeout", "1", *data)
    assert result.exit_code == 0, result.output


def test_library_entry_points_check_ids_before_connecting(stack_settings) -> None:
    from streamvqa.ask import ask, make_query
    from streamvqa.produce import ProduceOptions

    with pytest.raises(InvalidField) as info:
        ProduceOptions(stream_id="../x")
    assert info.value.field == "stream_id"
    with pytest.raises(InvalidField) as info:
        ask(stack_settings, "../x", "what?", timeout_s=1)
    assert info.value.field == "stream_id"
    with pytest.raises(InvalidField) as info:
        ask(stack_settings, "cam-1", "what?", query_id="../q", timeout_s=1)
    assert info.value.field == "query_id"
    # the longest valid stream id still makes a valid query id
    encode(make_query("s" * 128, "what?"))
