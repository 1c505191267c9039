"""The video-LM path of the main pipeline: `pipeline.lm_path` naming a local Qwen2.5-VL or
LLaVA-OneVision checkpoint (tiny random weights here, with SmolLM2's tokenizer) is loaded and
answers through the memory stage; with no path the shipped SmolLM2 is used."""

from __future__ import annotations

import time

import pytest

from streamvqa.operators.io.records import KafkaRecord
from streamvqa.pipelines.video_qa.graph import StageFactories, load_language_model
from streamvqa.schemas import Answer, Query, SpeechNote, decode, encode
from tests.tiny_models import tiny_llava_onevision, tiny_qwen25_vl

pytestmark = [pytest.mark.stack, pytest.mark.slow]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from streamvqa.operators.lm.smollm2 import ensure_converted

    return AutoTokenizer.from_pretrained(ensure_converted(), local_files_only=True)


@pytest.mark.parametrize(
    "make", [tiny_qwen25_vl, tiny_llava_onevision], ids=["qwen2.5-vl", "llava-onevision"]
)
def test_a_local_video_lm_answers_through_the_memory_stage(make, tokenizer, tmp_path, stack_settings) -> None:
    path = tmp_path / "weights"
    model = make(vocab=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    loaded, _, model_id = load_language_model(path)
    assert type(loaded) is type(model) and model_id == "local/weights"

    settings = stack_settings.model_copy(
        update={
            "pipeline": stack_settings.pipeline.model_copy(
                update={"lm_path": path, "text_features": False, "max_new_tokens": 4}
            )
        }
    )
    stage = StageFactories(settings).memory()
    sid = f"vlm-{model.config.model_type.replace('_', '-')}-{int(time.time() * 1000) % 100000}"
    state = stage.initial_state(sid)
    wall = int(time.time() * 1e6)

    def feed(value: bytes, offset: int):
        nonlocal state
        state, outputs = stage.process(
            state, KafkaRecord("memory", 0, offset, sid.encode(), value, wall // 1000)
        )
        return outputs

    for i, text in enumerate(["The red boat left the harbour.", "A dog barked twice at the mailman."]):
        feed(
            encode(
                SpeechNote(
                    stream_id=sid,
                    seq=i,
                    start_us=i * 5_000_000,
                    end_us=i * 5_000_000 + 3_000_000,
                    wall_us=wall,
                    text=text,
                )
            ),
            i,
        )
    outputs = feed(encode(Query(query_id=f"{sid}-q", stream_id=sid, text="What barked?", asked_at_us=1)), 9)
    assert stage.memory.model_id == "local/weights"
    # no frame yet: the question waits for the hold (an audio-only stream), then is answered
    assert outputs == []
    state, outputs = stage.tick(
        state, int(time.time() * 1e6) + int(settings.pipeline.hold_timeout_s * 1e6) + 1
    )
    [answer] = [decode(o.value, Answer) for o in outputs]
    assert answer.model_id == "local/weights" and answer.query_id == f"{sid}-q"
    assert answer.evidence and all(0 <= e.start_us <= e.end_us <= 8_000_000 for e in answer.evidence)
    # the state survives its bytes (the KV memory of the video LM is restored from the object store)
    again = stage.decode_state(stage.encode_state(state))
    assert again.kv.model_id == "local/weights" and again.utterances == 2


def test_no_path_means_the_shipped_smollm2() -> None:
    _, tokenizer, model_id = load_language_model(None)
    assert model_id.startswith("HuggingFaceTB/SmolLM2") and tokenizer is not None


def test_a_missing_path_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="lm_path"):
        load_language_model(tmp_path / "nowhere")
