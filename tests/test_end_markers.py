"""End of input is not a producer's to declare in a long-running job (issue #20, defect 1).

A record with the end-of-stream header used to stop the partition it was on for good (the commit
stopped before the marker, so every restart read it again), and one on each input partition made
the job exit 0. Now only a bounded run (``bounded=True`` / ``--bounded``) honours the header; the
long-running job dead-letters it and reads on, and a job whose sources end anyway fails."""

from __future__ import annotations

import signal
import subprocess
import time

import apache_beam as beam
import pytest
from typer.testing import CliRunner

from streamvqa import connect
from streamvqa.cli import app
from streamvqa.pipelines.video_qa import graph
from streamvqa.schemas import DeadLetter, decode
from tests.kafka_helpers import frame_bytes, new_topics, read_all, send_end_of_stream, start_passthrough


def _start(settings, topic: str, out: str, group: str, log) -> subprocess.Popen:
    return start_passthrough(
        settings, topic, out, group, log, "--commit-every", "5", "--commit-interval", "0.2"
    )


@pytest.mark.stack
@pytest.mark.slow
def test_end_markers_from_a_producer_do_not_stop_the_long_running_job(
    stack_settings, endpoints, tmp_path
) -> None:
    topic, out = new_topics(stack_settings, endpoints, "eos-in", "eos-out")
    producer = connect.producer(stack_settings, endpoints)
    streams = ("eos-a", "eos-b", "eos-c", "eos-d")
    for seq in range(5):
        for stream in streams:
            producer.send(topic, key=stream.encode(), value=frame_bytes(stream, seq))
    send_end_of_stream(producer, topic)  # one marker on every partition: the old job exited 0 here
    for seq in range(5, 10):
        for stream in streams:
            producer.send(topic, key=stream.encode(), value=frame_bytes(stream, seq))
    producer.flush()
    expected = sorted(f"{s}:{q}".encode() for q in range(10) for s in streams)
    with open(tmp_path / "job.log", "wb") as log:
        proc = _start(stack_settings, topic, out, f"g-{topic}", log)
        try:
            deadline = time.monotonic() + 120
            keys: list[bytes] = []
            while time.monotonic() < deadline and proc.poll() is None:
                keys = sorted(m.key for m in read_all(stack_settings, endpoints, out, timeout_ms=1000))
                if keys == expected:
                    break
                time.sleep(0.5)
            assert proc.poll() is None, f"the job ended (exit {proc.returncode}) at a producer's marker"
            assert keys == expected, f"{len(keys)} of {len(expected)} frames came through"
            # frames sent after the markers, once the job was restarted, still come through
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            for stream in streams:
                producer.send(topic, key=stream.encode(), value=frame_bytes(stream, 10))
            producer.flush()
            proc = _start(stack_settings, topic, out, f"g-{topic}", log)
            want = sorted([*expected, *(f"{s}:10".encode() for s in streams)])
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                keys = sorted(m.key for m in read_all(stack_settings, endpoints, out, timeout_ms=1000))
                if keys == want:
                    break
                time.sleep(0.5)
            assert proc.poll() is None and keys == want
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
            producer.close()
    letters = [
        decode(m.value, DeadLetter)
        for m in read_all(stack_settings, endpoints, stack_settings.topics.dead_letter)
    ]
    mine = [letter for letter in letters if letter.source_topic == topic]
    assert len(mine) == 3 and {letter.source_partition for letter in mine} == {0, 1, 2}
    assert all(
        letter.reason == "invalid_field" and "end-of-stream marker" in letter.detail for letter in mine
    ), mine


class _Bounded(beam.PTransform):
    def expand(self, pbegin):
        return pbegin | beam.Create([1, 2, 3]) | beam.Map(lambda x: x)


def test_a_main_job_whose_sources_end_fails_and_is_never_a_success(stack_settings, monkeypatch) -> None:
    """Whatever makes the sources end, the supervisor sees a failure and the CLI exits non-zero."""
    runs = []

    def build(pipeline, settings, group=graph.DEFAULT_GROUP):
        runs.append(group)
        pipeline | _Bounded()

    monkeypatch.setattr(graph, "build", build)
    with pytest.raises(graph.SourcesEnded):
        graph.run(stack_settings, "g-ends")
    with pytest.raises(graph.SourcesEnded):
        graph.run_supervised(stack_settings, "g-ends", backoff_s=(0.0, 0.0), attempts=2)
    assert runs == ["g-ends"] * 3  # retried like any failure
    result = CliRunner().invoke(
        app, ["run", "pipeline", "--no-restart", "--data-dir", str(stack_settings.data_dir)]
    )
    assert result.exit_code == 1 and "sources ended" in result.output, result.output
