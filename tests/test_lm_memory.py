"""The KV memory stage on tiny random-weight configs of the real transformers classes.

Llama (SmolLM2's architecture), Qwen2 inside LLaVA-OneVision, and Qwen2.5-VL (mRoPE): the
chunked prefill, the spill to the tiered store, re-rotation of moved blocks, retrieval, the
answer's evidence, isolation between streams and detection of corrupt or missing blocks.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from streamvqa import connect
from streamvqa.operators.kv import ObjectTier, TieredStore, cpu_tier, standard_store
from streamvqa.operators.kv.errors import BlockMismatch
from streamvqa.operators.lm.memory import KVMemory, KVMemoryConfig, StreamKV
from streamvqa.operators.lm.model import DecoderAdapter
from streamvqa.operators.lm.rope import shift_keys
from tests.numerics import assert_reordered_close, of_config, reorder_atol, rotation_atol
from tests.tiny_models import VOCAB, tiny_llama, tiny_llava_onevision, tiny_qwen25_vl

pytestmark = pytest.mark.numerics


def same_logits(adapter: DecoderAdapter, actual: torch.Tensor, expected: torch.Tensor, context: int) -> None:
    """The streamed memory's logits against the full-context model's: the same arithmetic in
    another order (chunks, spilled and re-rotated blocks), within its float32 bound."""
    assert_reordered_close(actual, expected, **of_config(adapter.config, context))


def memory_store(**budgets) -> TieredStore:
    return standard_store(gpu_bytes=budgets.get("gpu", 1 << 20), cpu_bytes=budgets.get("cpu", 1 << 30))


def new_stream() -> str:
    return f"s-{uuid.uuid4().hex[:8]}"


def ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 2, (n,), generator=g)


def full_logits(adapter: DecoderAdapter, token_ids: torch.Tensor) -> torch.Tensor:
    out = adapter.forward(adapter.embed(token_ids), torch.arange(len(token_ids)), logits="all")
    return out.logits


# -- positions --------------------------------------------------------------------------
@pytest.mark.parametrize("delta", [1, 37, 1000])
def test_moving_a_block_by_rerotation_equals_encoding_it_at_the_new_position(delta: int) -> None:
    # A chunk with no context is position-invariant except for RoPE: its post-RoPE keys at
    # p + delta are the keys at p rotated by delta, in every layer.
    adapter = DecoderAdapter(tiny_llama())
    x = adapter.embed(ids(24, 1))
    at_0 = adapter.forward(x, torch.arange(5, 29)).keys
    at_d = adapter.forward(x, torch.arange(5 + delta, 29 + delta)).keys
    moved = shift_keys(at_0, delta, adapter.inv_freq)
    assert not torch.allclose(at_0, at_d, atol=1e-3)
    # each layer's keys carry the rotation's error and what the layers before it made of theirs
    atol = adapter.num_layers * rotation_atol(at_d, max_position=29 + delta)
    torch.testing.assert_close(moved, at_d, atol=atol, rtol=0)
    torch.testing.assert_close(shift_keys(moved, -delta, adapter.inv_freq), at_0, atol=2 * atol, rtol=0)


def test_mrope_blocks_move_as_a_whole() -> None:
    # Qwen2.5-VL: a frame's tokens at (t, t + row, t + col); shifting all three components by
    # delta is one rotation by delta per frequency, whatever section a frequency belongs to.
    adapter = DecoderAdapter(tiny_qwen25_vl())
    assert adapter.mrope
    x = torch.randn(12, adapter.hidden_size)
    r = torch.arange(3).repeat_interleave(4)
    c = torch.arange(4).repeat(3)
    pos = torch.stack([torch.zeros(12, dtype=torch.int64), r, c])
    at_0 = adapter.forward(x, pos + 7).keys
    at_d = adapter.forward(x, pos + 7 + 250).keys
    torch.testing.assert_close(
        shift_keys(at_0, 250, adapter.inv_freq),
        at_d,
        atol=adapter.num_layers * rotation_atol(at_d, max_position=int(pos.max()) + 250),
        rtol=0,
    )


# -- the memory equals the full-context model when nothing is dropped -----------------
def _prefill_chunks(mem: KVMemory, stream: str, chunks: list[torch.Tensor], sink: torch.Tensor) -> StreamKV:
    state = mem.open(stream, sink)
    for i, chunk in enumerate(chunks):
        state = mem.prefill_tokens(state, chunk, i * 1_000_000, (i + 1) * 1_000_000)
    return state


def test_window_holding_everything_gives_the_full_context_logits() -> None:
    adapter = DecoderAdapter(tiny_llama())
    mem = KVMemory(adapter, memory_store(), config=KVMemoryConfig(window_tokens=10_000, block_tokens=16))
    sink, chunks, question = ids(6, 0), [ids(n, 10 + n) for n in (20, 33, 7, 40)], ids(9, 99)
    state = _prefill_chunks(mem, new_stream(), chunks, sink)
    assert state.index == [] and [b.num_tokens for b in state.window] == [16, 4, 16, 16, 1, 7, 16, 16, 8]
    keys, values, base = mem.assemble([state.sink, *state.window])
    out = adapter.forward(adapter.embed(question), torch.arange(base, base + 9), (keys, values), logits="all")
    expected = full_logits(adapter, torch.cat([sink, *chunks, question]))[-9:]
    same_logits(adapter, out.logits, expected, context=base + 9)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_llava_onevision], ids=["llama", "llava-ov-qwen2"])
def test_retrieving_every_spilled_block_gives_the_full_context_answer(factory) -> None:
    adapter = DecoderAdapter(factory())
    mem = KVMemory(
        adapter,
        memory_store(gpu=8_000),  # small: blocks go on to the cpu tier
        config=KVMemoryConfig(window_tokens=10_000, block_tokens=12, retrieve_tokens=10**6, max_new_tokens=6),
    )
    sink, chunks, question = ids(5, 0), [ids(30, 1), ids(25, 2), ids(18, 3)], ids(8, 4)
    state = _prefill_chunks(mem, new_stream(), chunks, sink)
    mem.spill(state)  # every window block to the store
    assert state.window == [] and [s.num_tokens for s in state.index] == [12, 12, 6, 12, 12, 1, 12, 6]
    mem.store.flush()
    assert {mem.store.where(s.key)[0] for s in state.index} == {"gpu", "cpu"}
    found = mem.retrieve(state, question)
    assert [b.block_index for b in found.blocks] == [s.block_index for s in state.index]
    keys, values, base = mem.assemble([state.sink, *found.blocks])
    out = adapter.forward(adapter.embed(question), torch.arange(base, base + 8), (keys, values), logits="all")
    full = torch.cat([sink, *chunks, question])
    same_logits(adapter, out.logits, full_logits(adapter, full)[-8:], context=len(full))
    # Greedy answer equals greedy decoding of the full-context model.
    answer = mem.answer(state, question)
    expected, seq = [], full.clone()
    for _ in range(6):
        token = int(full_logits(adapter, seq)[-1].argmax())
        expected.append(token)
        seq = torch.cat([seq, torch.tensor([token])])
    assert answer.token_ids == expected
    assert [e.block_index for e in answer.evidence] == [s.block_index for s in state.index]
    assert answer.evidence[0].start_us == 0 and answer.evidence[-1].end_us == 3_000_000
    assert answer.unusable == [] and answer.context_tokens == 5 + 73 + 8
    assert {"query", "score", "fetch", "prefill", "ttft", "decode", "total"} <= set(answer.timings_ms)


def test_qwen25_vl_frames_and_text_equal_the_full_model_with_3d_positions() -> None:
    adapter = DecoderAdapter(tiny_qwen25_vl())
    mem = KVMemory(
        adapter,
        memory_store(),
        config=KVMemoryConfig(window_tokens=10_000, block_tokens=8, retrieve_tokens=10**6),
    )
    torch.manual_seed(3)
    sink, text, question = ids(4, 0), ids(10, 1), ids(5, 2)
    frame_a, frame_b = torch.randn(6, 64), torch.randn(6, 64)  # 2 x 3 grids
    state = mem.open(new_stream(), sink)
    state = mem.prefill_embeds(state, frame_a, 0, 500_000, grid=(2, 3))
    state = mem.prefill_tokens(state, text, 500_000, 900_000)
    state = mem.prefill_embeds(state, frame_b, 1_000_000, 1_500_000, grid=(2, 3))

    # The full sequence with Qwen2.5-VL's own layout: text t=h=w; a frame at (s, s+row, s+col),
    # the next token at s + max(rows, cols).
    def grid(start):
        r, c = torch.arange(2).repeat_interleave(3), torch.arange(3).repeat(2)
        return torch.stack([torch.zeros(6, dtype=torch.int64), r, c]) + start

    def text_pos(start, n):
        return torch.arange(start, start + n).expand(3, n)

    pos = torch.cat([text_pos(0, 4), grid(4), text_pos(7, 10), grid(17), text_pos(20, 5)], dim=1)
    embeds = torch.cat([adapter.embed(sink), frame_a, adapter.embed(text), frame_b, adapter.embed(question)])
    expected = adapter.forward(embeds, pos, logits="all").logits[-5:]
    mem.spill(state)
    found = mem.retrieve(state, question)
    keys, values, base = mem.assemble([state.sink, *found.blocks])
    assert base == 20
    out = adapter.forward(adapter.embed(question), text_pos(20, 5), (keys, values), logits="all")
    same_logits(adapter, out.logits, expected, context=len(embeds))


# -- sliding window and spill ---------------------------------------------------------
def test_window_stays_bounded_and_spilled_blocks_keep_their_time_ranges() -> None:
    adapter = DecoderAdapter(tiny_llama())
    mem = KVMemory(adapter, memory_store(), config=KVMemoryConfig(window_tokens=40, block_tokens=10))
    state = mem.open(new_stream(), ids(4, 0))
    for i in range(30):
        state = mem.prefill_tokens(state, ids(10, i), i * 1000, i * 1000 + 999)
        assert state.window_tokens <= 40
    assert [s.block_index for s in state.index] == list(range(1, 27))
    assert [s.start_us for s in state.index] == [i * 1000 for i in range(26)]
    # Positions never outgrow sink + window + chunk, however long the stream.
    assert max(int(b.attrs["base"]) + int(b.attrs["span"]) for b in state.window) <= 4 + 40 + 10


def test_top_k_retrieval_picks_the_best_scored_blocks_in_time_order() -> None:
    from streamvqa.operators.lm.scoring import combine_layer_scores, score_blocks_torch

    adapter = DecoderAdapter(tiny_llama())
    mem = KVMemory(adapter, memory_store(), config=KVMemoryConfig(window_tokens=20, block_tokens=10, top_k=3))
    state = mem.open(new_stream(), ids(4, 0))
    for i in range(12):
        state = mem.prefill_tokens(state, ids(10, 100 + i), i, i)
    question = ids(6, 7)
    found = mem.retrieve(state, question)
    keys, values, base = mem.assemble([state.sink, *state.window])
    probe = adapter.forward(
        adapter.embed(question), torch.arange(base, base + 6), (keys, values), capture="queries"
    )
    # ReKV's question vector, centred by the stream's running mean query.
    query = probe.pre_rope_queries.mean(dim=2) - state.query_mean
    scores = combine_layer_scores(score_blocks_torch(query, state.mean_keys()))
    best = sorted(torch.argsort(scores, descending=True)[:3].tolist())
    assert [e.block_index for e in found.evidence] == [state.index[i].block_index for i in best]
    assert [e.score for e in found.evidence] == pytest.approx([float(scores[i]) for i in best])


def test_state_round_trips_and_the_stream_goes_on_identically() -> None:
    adapter = DecoderAdapter(tiny_llama())
    store = memory_store()
    mem = KVMemory(adapter, store, config=KVMemoryConfig(window_tokens=30, block_tokens=10))
    stream = new_stream()
    state = mem.open(stream, ids(4, 0))
    for i in range(6):
        state = mem.prefill_tokens(state, ids(10, i), i, i)
    restored = StreamKV.from_bytes(state.to_bytes(), store)
    assert restored.next_index == state.next_index and restored.sink.equal(state.sink)
    assert [b.key() for b in restored.window] == [b.key() for b in state.window]
    assert [s.key for s in restored.index] == [s.key for s in state.index]
    assert restored.query_count == state.query_count == 60
    assert torch.equal(restored.query_mean, state.query_mean)
    a = mem.prefill_tokens(state, ids(10, 50), 9, 9)
    b = mem.prefill_tokens(restored, ids(10, 50), 9, 9)
    assert [x.key() for x in a.window] == [y.key() for y in b.window]


# -- isolation and damaged blocks ---------------------------------------------------
def test_a_stream_never_uses_another_streams_blocks() -> None:
    adapter = DecoderAdapter(tiny_llama())
    store = memory_store()
    mem = KVMemory(adapter, store, config=KVMemoryConfig(window_tokens=10, block_tokens=10))
    a = mem.open(new_stream(), ids(4, 0))
    b = mem.open(new_stream(), ids(4, 0))
    for i in range(4):
        a = mem.prefill_tokens(a, ids(10, i), i, i)
        b = mem.prefill_tokens(b, ids(10, 10 + i), i, i)
    # A crafted index entry pointing at stream A's block inside stream B's memory.
    b.index.append(a.index[0])
    b._stacked = None
    found = mem.retrieve(b, ids(5, 3))
    assert all(blk.stream_id == b.stream_id for blk in found.blocks)
    assert [k for k, _ in found.unusable] == [str(a.index[0].key)]
    assert "another stream" in found.unusable[0][1]
    # A state claiming another stream's blocks does not load.
    forged = StreamKV(stream_id=b.stream_id, model_id=b.model_id, sink=b.sink, index=[a.index[0]])
    with pytest.raises(BlockMismatch):
        StreamKV.from_bytes(forged.to_bytes(), store)


@pytest.fixture()
def object_store(stack_settings, endpoints):
    return connect.object_store(stack_settings, endpoints)


@pytest.mark.stack
def test_corrupt_and_missing_objects_are_reported_not_used(object_store) -> None:
    adapter = DecoderAdapter(tiny_llama())
    store = TieredStore([(cpu_tier(), 1), (ObjectTier(object_store), None)])  # 1 byte: straight to S3
    mem = KVMemory(
        adapter, store, config=KVMemoryConfig(window_tokens=10, block_tokens=10, retrieve_tokens=10**6)
    )
    state = mem.open(new_stream(), ids(4, 0))
    for i in range(5):
        state = mem.prefill_tokens(state, ids(10, i), i * 10, i * 10 + 9)
    store.flush()
    assert all(store.where(s.key) == ["s3"] or store.where(s.key)[-1] != "cpu" for s in state.index)
    bad, gone = state.index[1].key, state.index[2].key
    data = bytearray(object_store.get(bad.path))
    data[len(data) // 2] ^= 0x40
    object_store.put(bad.path, bytes(data))
    object_store.delete(gone.path)
    answer = mem.answer(state, ids(5, 9), max_new_tokens=2)
    reasons = dict(answer.unusable)
    assert set(reasons) == {str(bad), str(gone)}
    assert "BlockCorrupt" in reasons[str(bad)] and "BlockNotFound" in reasons[str(gone)]
    used = [e.block_index for e in answer.evidence]
    assert used == [s.block_index for s in state.index if s.key not in (bad, gone)]
    store.close()


def test_configuration_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="window_tokens"):
        KVMemoryConfig(window_tokens=0)
    with pytest.raises(ValueError, match="top_k"):
        KVMemoryConfig(top_k=-1)
    adapter = DecoderAdapter(tiny_llama())
    mem = KVMemory(adapter, memory_store())
    with pytest.raises(ValueError, match="tokenizer"):
        mem.open(new_stream(), "a system prompt")
    state = mem.open(new_stream(), ids(3, 0))
    with pytest.raises(ValueError, match="grid"):
        mem.prefill_embeds(state, torch.randn(5, 64), 0, 1, grid=(2, 3))
    with pytest.raises(ValueError, match=r"not a valid|stream id|invalid"):
        StreamKV(stream_id="../other", model_id="m")


# -- external features -------------------------------------------------------------
def test_an_example_image_feature_finds_its_frame() -> None:
    # "When did this appear?": frames carry pooled visual features; the question's image
    # feature picks the frame whose feature matches, whatever the KV scores say.
    adapter = DecoderAdapter(tiny_llama())
    mem = KVMemory(
        adapter, memory_store(), config=KVMemoryConfig(window_tokens=8, top_k=1, feature_weight=100.0)
    )
    state = mem.open(new_stream(), ids(4, 0))
    g = torch.Generator().manual_seed(5)
    features = [torch.randn(32, generator=g) for _ in range(6)]
    for i, feat in enumerate(features):
        state = mem.prefill_embeds(
            state, torch.randn(8, 64, generator=g), i * 1000, i * 1000 + 999, feature=("image:test", feat)
        )
    assert [s.block_index for s in state.index] == [1, 2, 3, 4, 5]
    query = features[2] + 0.1 * torch.randn(32, generator=g)
    found = mem.retrieve(state, ids(3, 1), query_feature=("image:test", query))
    assert [(e.block_index, e.start_us) for e in found.evidence] == [(3, 2000)]
    # Another space's feature is not compared: the choice falls back to the KV scores alone.
    other = mem.retrieve(state, ids(3, 1), query_feature=("text:other", query))
    plain = KVMemory(adapter, mem.store, config=KVMemoryConfig(window_tokens=8, top_k=1)).retrieve(
        state, ids(3, 1)
    )
    assert [e.block_index for e in other.evidence] == [e.block_index for e in plain.evidence]
    # Features survive the state's round trip.
    restored = StreamKV.from_bytes(state.to_bytes(), mem.store)
    assert restored.features.keys() == state.features.keys()
    assert all(torch.equal(restored.features[k][1], state.features[k][1]) for k in state.features)


@pytest.mark.slow
def test_smollm2_answers_a_fact_spilled_to_the_store() -> None:
    # The real model (SmolLM2-135M-Instruct, converted once to the cache) and the real text
    # embedder: a fact told early in a stream has left the window; retrieval brings it back.
    from streamvqa.operators.lm.features import MiniLMEmbedder
    from streamvqa.operators.lm.smollm2 import MODEL_ID, load_smollm2

    model, tokenizer = load_smollm2()
    mem = KVMemory(
        DecoderAdapter(model, model_id=MODEL_ID),
        memory_store(),
        tokenizer=tokenizer,
        config=KVMemoryConfig(window_tokens=96, block_tokens=48, retrieve_tokens=96, max_new_tokens=16),
        embedder=MiniLMEmbedder(),
    )
    state = mem.open(new_stream())
    filler = [
        "The market opens early and closes when the bread is gone.",
        "Children walk to school past the old stone bridge.",
        "A train passes in the distance, right on time as usual.",
        "The garden has roses, tulips and a small lemon tree.",
        "Fishermen return in the afternoon with their nets.",
        "Snow covers the hills for most of the winter.",
    ]
    texts = [*filler[:2], "The pass key is 60714. Remember it. 60714 is the pass key.", *filler[2:], *filler]
    for i, text in enumerate(texts):
        state = mem.prefill_text(state, text, i * 1_000_000, i * 1_000_000 + 999_999)
    fact_block = next(b for b in state.index if b.start_us == 2_000_000)
    assert fact_block.key in {s.key for s in state.index}  # spilled, not in the window
    answer = mem.answer(state, "What is the pass key?")
    assert "60714" in answer.text
    assert 2_000_000 in [e.start_us for e in answer.evidence]
    baseline = KVMemory(
        mem.adapter,
        mem.store,
        tokenizer=tokenizer,
        config=KVMemoryConfig(window_tokens=96, retrieve_tokens=0, max_new_tokens=16),
    )
    assert "60714" not in baseline.answer(state, "What is the pass key?").text  # StreamingLLM forgot it


def test_recompute_context_rebuilds_the_full_context_from_token_ids() -> None:
    # A small window: blocks were encoded next to a few neighbours only, so their stored KV
    # differs from the full model's. "recompute" re-prefills the retrieved text blocks in order
    # and gets the full-context logits back; frames (no token ids) would keep their stored KV.
    adapter = DecoderAdapter(tiny_llama())
    cfg = {"window_tokens": 12, "block_tokens": 12, "retrieve_tokens": 10**6}
    mem = KVMemory(adapter, memory_store(), config=KVMemoryConfig(**cfg))
    sink, chunks, question = ids(5, 0), [ids(12, i) for i in range(1, 6)], ids(7, 9)
    state = _prefill_chunks(mem, new_stream(), chunks, sink)
    assert all("token_ids" in b.attrs for b in state.index)
    found = mem.retrieve(state, question)
    context = [state.sink, *found.blocks, *state.window]
    expected = full_logits(adapter, torch.cat([sink, *chunks, question]))[-7:]
    for how, should_match in (("recompute", True), ("stored", False)):
        keys, values, base = (mem.assemble_recomputed if how == "recompute" else mem.assemble)(context)
        assert base == 5 + 60
        out = adapter.forward(
            adapter.embed(question), torch.arange(base, base + 7), (keys, values), logits="all"
        )
        if should_match:
            same_logits(adapter, out.logits, expected, context=base + 7)
        else:  # the stored keys of a moved block are not the recomputed ones: far beyond the bound
            atol = reorder_atol(expected, **of_config(adapter.config, base + 7))
            assert (out.logits - expected).abs().max() > 10 * atol, how
    recompute = KVMemory(adapter, mem.store, config=KVMemoryConfig(**cfg, answer_context="recompute"))
    greedy = int(expected[-1].argmax())
    assert recompute.answer(state, question, max_new_tokens=1).token_ids == [greedy]
    with pytest.raises(ValueError, match="answer_context"):
        KVMemoryConfig(answer_context="cached")


def test_best_last_puts_the_best_retrieved_block_right_before_the_question() -> None:
    # context_order="best_last": sink, recent window, retrieved blocks from the lowest score to the
    # highest, question. With recompute that is exactly the full model over the tokens in that order.
    adapter = DecoderAdapter(tiny_llama())
    cfg = {"window_tokens": 12, "block_tokens": 12, "retrieve_tokens": 10**6, "answer_context": "recompute"}
    mem = KVMemory(adapter, memory_store(), config=KVMemoryConfig(**cfg, context_order="best_last"))
    in_time = KVMemory(adapter, mem.store, config=KVMemoryConfig(**cfg))
    sink, chunks = ids(5, 0), [ids(12, i) for i in range(1, 6)]
    state = _prefill_chunks(mem, new_stream(), chunks, sink)
    assert len(state.window) == 1 and len(state.index) == 4  # the last chunk recent, four retrieved
    differs = 0
    for seed in range(9, 40):
        question = ids(7, seed)
        found = mem.retrieve(state, question)
        ranked = [chunks[e.block_index - 1] for e in sorted(found.evidence, key=lambda e: e.score)]
        assert len(ranked) == 4
        best_last = int(full_logits(adapter, torch.cat([sink, chunks[-1], *ranked, question]))[-1].argmax())
        timely = int(full_logits(adapter, torch.cat([sink, *chunks, question]))[-1].argmax())
        assert mem.answer(state, question, max_new_tokens=1).token_ids == [best_last]
        assert in_time.answer(state, question, max_new_tokens=1).token_ids == [timely]
        differs += best_last != timely
    assert differs  # the two orders gave different answers at least once: the order was applied
    with pytest.raises(ValueError, match="context_order"):
        KVMemoryConfig(context_order="relevance")
