"""The main job of streamvqa: streaming video question answering.

    frames  --[FrameStage]---+
    audio   --[AudioStage]---+--> memory topic --[MemoryStage]--> answers
    queries --[QueryStage]---+

Each stage is a plain :class:`~streamvqa.operators.io.exactly_once.StreamProcessor` (state in,
outputs and state out, testable without Beam); :mod:`.graph` runs all four in one fused Beam
step under the exactly-once task. See docs/pipeline.md.
"""

from .audio import AudioStage
from .frames import FrameStage
from .memory import MemoryStage
from .queries import QueryStage

__all__ = ["AudioStage", "FrameStage", "MemoryStage", "QueryStage"]
