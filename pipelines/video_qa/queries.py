"""QueryStage: validate a question (bad ones go to the dead letters) and forward it, unchanged,
to the memory topic, into the partition of its stream: there it meets the stream's notes, in
order, and the memory stage answers it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from streamvqa.operators.io.records import KafkaRecord, Output, scoped_id
from streamvqa.schemas import Limits, Query

from .common import decode_keyed, note
from .frames import decode_image


@dataclass
class QueryStage:
    memory_topic: str
    limits: Limits = field(default_factory=Limits)
    name: str = "queries"

    def initial_state(self, stream_id: str) -> dict:
        return {"forwarded": 0}

    def encode_state(self, state: dict) -> bytes:
        return json.dumps(state).encode()

    def decode_state(self, data: bytes) -> dict:
        return json.loads(data)

    def process(self, state: dict, record: KafkaRecord) -> tuple[dict, list[Output]]:
        query = decode_keyed(record, Query, self.limits)  # SchemaError -> dead letter
        if query.image is not None:
            decode_image(query.image, "image")  # an example image that does not decode: dead letter
        out = note(self.memory_topic, scoped_id(query.stream_id, "q", query.query_id), record.value, record)
        return {"forwarded": state["forwarded"] + 1}, [out]
