"""SIGKILL the pass-through pipeline at random moments while numbered frames flow;
restart it each time; in the end every input has exactly one output."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time

import pytest

from streamvqa import connect
from tests.kafka_helpers import frame_bytes, new_topics, read_all, send_end_of_stream, start_passthrough

pytestmark = [pytest.mark.stack, pytest.mark.slow]

STREAMS = [f"chaos-{i}" for i in range(6)]
FRAMES_PER_STREAM = 250
KILLS = 6


def _start(settings, topic: str, out: str, group: str, log) -> subprocess.Popen:
    return start_passthrough(
        settings, topic, out, group, log, "--commit-every", "50", "--commit-interval", "0.3", "--bounded"
    )


def test_sigkilled_pipeline_gives_exactly_one_output_per_input(stack_settings, endpoints, tmp_path) -> None:
    topic, out = new_topics(stack_settings, endpoints, "chaos-in", "chaos-out")
    group = f"g-{topic}"
    rng = random.Random(20261123)

    def produce() -> None:
        producer = connect.producer(stack_settings, endpoints)
        for seq in range(FRAMES_PER_STREAM):
            for stream in STREAMS:
                producer.send(topic, key=stream.encode(), value=frame_bytes(stream, seq, size=2048))
            if seq % 25 == 0:  # a producer retry after a timeout: the same frame again
                producer.send(topic, key=STREAMS[0].encode(), value=frame_bytes(STREAMS[0], seq, size=2048))
            time.sleep(0.06)  # about 100 frames/s for ~15 s
        send_end_of_stream(producer, topic)
        producer.flush()
        producer.close()

    feeder = threading.Thread(target=produce, daemon=True)
    feeder.start()
    outputs_at_kill = []
    with open(tmp_path / "pipeline.log", "ab") as log:
        for _ in range(KILLS):
            proc = _start(stack_settings, topic, out, group, log)
            time.sleep(rng.uniform(2.5, 6.0))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            outputs_at_kill.append(len(read_all(stack_settings, endpoints, out, timeout_ms=500)))
        feeder.join(timeout=120)
        final = _start(stack_settings, topic, out, group, log)
        try:
            assert final.wait(timeout=180) == 0, (tmp_path / "pipeline.log").read_text()[-3000:]
        finally:
            if final.poll() is None:
                os.killpg(final.pid, signal.SIGKILL)

    # The kills landed while the stream was being processed, not only before or after it.
    assert any(0 < n < len(STREAMS) * FRAMES_PER_STREAM for n in outputs_at_kill), outputs_at_kill
    messages = read_all(stack_settings, endpoints, out)  # read_committed consumer
    keys = [m.key for m in messages]
    expected = {f"{s}:{q}".encode() for s in STREAMS for q in range(FRAMES_PER_STREAM)}
    duplicates = len(keys) - len(set(keys))
    assert duplicates == 0, f"{duplicates} duplicated outputs"
    assert set(keys) == expected, f"missing {len(expected - set(keys))}"
    # Per stream, outputs appear in sequence order.
    for stream in STREAMS:
        seqs = [int(k.split(b":")[1]) for k in keys if k.startswith(stream.encode() + b":")]
        assert seqs == sorted(seqs)
