"""KV memory of a stream: chunked prefill with attention sinks and a sliding window, blocks spilled
to the tiered store, and question answering over retrieved blocks (StreamingLLM + ReKV).

One :class:`KVMemory` (the operator: a model and a store) serves many streams; the state of a
stream is an explicit :class:`StreamKV` value (sink block, window blocks, index of spilled
blocks) passed in and returned, serialisable with :meth:`StreamKV.to_bytes`.

Prefill: every chunk (text of a time range, or one frame's visual tokens) is run over
``sink + window`` laid out at contiguous positions and becomes one or more blocks. Blocks that
no longer fit the window (``window_tokens``) leave it, oldest first, into the
:class:`~streamvqa.operators.kv.TieredStore` (GPU -> CPU -> disk -> object store); the stream
keeps only their summaries (per-layer mean pre-RoPE keys) to score later.

Question (ReKV): the question's tokens run over ``sink + window`` without being kept, giving the
mean pre-RoPE query per layer; each spilled block is scored per layer by the dot product of that
query with its mean key (GQA heads expanded), per-layer scores are standardised and averaged;
the best blocks within ``retrieve_tokens`` are fetched from whatever tier holds them (verified by
content hash), laid out in time order between the sink and the window, and the question is
prefilled over ``sink + retrieved + window`` and decoded greedily. The answer reports the time
ranges it used (its evidence), blocks that could not be used and why, and its latency breakdown.

Positions: keys are stored after RoPE at the positions they were encoded at, and re-rotated by
the offset when a block is laid out somewhere else (:mod:`.rope`). See docs/kv-memory.md.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from streamvqa.operators.kv import (
    BlockKey,
    BlockMismatch,
    BlockSummary,
    KVBlock,
    KVStoreError,
    TieredStore,
    decode_block,
    encode_block,
)
from streamvqa.storage.keys import stream_prefix

from .features import feature_scores
from .model import DecoderAdapter
from .prompt import ChatFormat, PromptFormat
from .rope import shift_keys
from .scoring import combine_layer_scores, score_blocks, select_blocks

STATE_FORMAT = b"streamvqa.kv.stream/1"
MAX_TOKEN_ATTR = 12 * 1024  # token ids kept in a block's attrs when they fit (blocks' attrs <= 16 KiB)
ANSWER_CONTEXTS = ("stored", "recompute")
CONTEXT_ORDERS = ("time", "best_last")


@dataclass(frozen=True)
class KVMemoryConfig:
    """Sizes of a stream's attention context, in tokens."""

    window_tokens: int = 2048  # recent tokens kept in attention after the sink
    block_tokens: int = 256  # text chunks are cut into blocks of at most this many tokens
    retrieve_tokens: int = 2048  # budget of retrieved tokens per question
    top_k: int | None = None  # at most this many retrieved blocks (None: the token budget decides)
    max_new_tokens: int = 48
    kernel_backend: str = "auto"  # block scoring: auto | torch | triton
    feature_weight: float = 1.0  # weight of the external feature score beside the ReKV score
    center_query: bool = True  # subtract the stream's mean query from the question's (see StreamKV)
    # How the answer's context is built: "stored" reuses every block's stored KV (ReKV);
    # "recompute" re-prefills the retrieved and window text blocks from their token ids in the
    # order they are laid out (their stored KV was computed next to other neighbours), keeping
    # the stored KV for blocks without token ids (frames). Costs a prefill of at most
    # retrieve_tokens + window_tokens, whatever the stream's length.
    answer_context: str = "stored"
    # Where the retrieved blocks go: "time" (ReKV: sink, retrieved blocks in time order, then the
    # recent window) or "best_last" (sink, window, then the retrieved blocks from the least to the
    # most relevant, so the best block is right before the question). A small reader answers
    # from what it read last: the recent window, or the filler blocks retrieved beside the fact
    # (docs/kv-memory.md).
    context_order: str = "time"

    def __post_init__(self) -> None:
        for name in ("window_tokens", "block_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.retrieve_tokens, bool) or not isinstance(self.retrieve_tokens, int):
            raise ValueError("retrieve_tokens must be an int >= 0")
        if self.retrieve_tokens < 0:
            raise ValueError("retrieve_tokens must be >= 0")
        if self.answer_context not in ANSWER_CONTEXTS:
            raise ValueError(f"answer_context must be one of {ANSWER_CONTEXTS}, got {self.answer_context!r}")
        if self.context_order not in CONTEXT_ORDERS:
            raise ValueError(f"context_order must be one of {CONTEXT_ORDERS}, got {self.context_order!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be None or an int >= 0, got {self.top_k!r}")


@dataclass
class StreamKV:
    """The KV memory state of one stream (explicit, serialisable)."""

    stream_id: str
    model_id: str
    sink: KVBlock | None = None
    window: list[KVBlock] = field(default_factory=list)
    index: list[BlockSummary] = field(default_factory=list)  # spilled blocks, in order
    next_index: int = 0
    features: dict[int, tuple[str, torch.Tensor]] = field(default_factory=dict)  # block index -> (space, vec)
    # Running mean of the pre-RoPE queries of every token prefilled (layers, heads, head_dim) and
    # its count: subtracted from a question's query, it removes what every query of this stream
    # looks for (sink-like, position-like directions) and leaves what this question asks.
    query_mean: torch.Tensor | None = None
    query_count: int = 0
    _stacked: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        stream_prefix(self.stream_id)  # validates the id

    @property
    def window_tokens(self) -> int:
        return sum(b.num_tokens for b in self.window)

    @property
    def spilled_tokens(self) -> int:
        return sum(s.num_tokens for s in self.index)

    def mean_keys(self) -> torch.Tensor:
        """(blocks, layers, kv_heads, head_dim) float32 of the spilled blocks (cached)."""
        if self._stacked is None or self._stacked.shape[0] != len(self.index):
            self._stacked = torch.stack([s.mean_keys.float().cpu() for s in self.index])
        return self._stacked

    # -- serialisation -------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Sink and window blocks in full, the index as keys (summaries are re-read from the store)."""
        blobs = [encode_block(b).data for b in ([self.sink] if self.sink else []) + self.window]
        feats = sorted(self.features.items())
        feat_bytes = b"".join(vec.float().contiguous().numpy().tobytes() for _, (_, vec) in feats)
        qm = b"" if self.query_mean is None else self.query_mean.float().contiguous().numpy().tobytes()
        header = {
            "query_mean": None
            if self.query_mean is None
            else [list(self.query_mean.shape), self.query_count],
            "features": [[i, space, int(vec.numel())] for i, (space, vec) in feats],
            "stream_id": self.stream_id,
            "model_id": self.model_id,
            "next_index": self.next_index,
            "has_sink": self.sink is not None,
            "blocks": [len(b) for b in blobs],
            "index": [s.key.path for s in self.index],
        }
        head = json.dumps(header, sort_keys=True).encode()
        return STATE_FORMAT + struct.pack("<I", len(head)) + head + b"".join(blobs) + feat_bytes + qm

    @classmethod
    def from_bytes(cls, data: bytes, store: TieredStore) -> StreamKV:
        """The state back; index summaries come from ``store`` (verified against their keys)."""
        if not data.startswith(STATE_FORMAT):
            raise ValueError("not a streamvqa KV stream state")
        at = len(STATE_FORMAT)
        (n,) = struct.unpack_from("<I", data, at)
        at += 4
        header = json.loads(data[at : at + n])
        at += n
        blocks = []
        for size in header["blocks"]:
            blocks.append(decode_block(data[at : at + size], where="stream state"))
            at += size
        state = cls(
            stream_id=header["stream_id"], model_id=header["model_id"], next_index=header["next_index"]
        )
        for index, space, dim in header["features"]:
            vec = torch.frombuffer(bytearray(data[at : at + 4 * dim]), dtype=torch.float32)
            if vec.numel() != dim:
                raise ValueError("truncated stream state")
            state.features[int(index)] = (space, vec)
            at += 4 * dim
        if header.get("query_mean"):
            shape, count = header["query_mean"]
            size = 4 * int(torch.Size(shape).numel())
            state.query_mean = torch.frombuffer(bytearray(data[at : at + size]), dtype=torch.float32).reshape(
                shape
            )
            state.query_count = int(count)
            at += size
        for block in blocks:
            _check_owner(block.stream_id, block.model_id, state)
        if header["has_sink"]:
            state.sink, blocks = blocks[0], blocks[1:]
        state.window = blocks
        state.index = [store.get_summary(BlockKey.parse(path)) for path in header["index"]]
        for summary in state.index:
            _check_owner(summary.key.stream_id, summary.key.model_id, state)
        return state


def _check_owner(stream_id: str, model_id: str, state: StreamKV) -> None:
    if stream_id != state.stream_id or model_id != state.model_id:
        raise BlockMismatch(
            f"block of stream {stream_id!r} / model {model_id!r} in the memory of stream "
            f"{state.stream_id!r} / model {state.model_id!r}"
        )


@dataclass(frozen=True)
class Evidence:
    """A spilled block an answer used: its time range and retrieval score."""

    block_index: int
    start_us: int
    end_us: int
    score: float
    tier: str  # the fastest tier that held it when fetched


@dataclass(frozen=True)
class Retrieval:
    blocks: list[KVBlock]  # fetched, verified, in time order
    evidence: list[Evidence]
    unusable: list[tuple[str, str]]  # (block key, reason): picked but missing or corrupt, not used
    timings_ms: dict[str, float]


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: list[int]
    evidence: list[Evidence]  # retrieved blocks, in time order
    window_range_us: tuple[int, int] | None  # the recent window the model also saw
    unusable: list[tuple[str, str]]  # (block key, reason): picked but missing or corrupt, not used
    context_tokens: int  # sink + retrieved + window
    timings_ms: dict[str, float]  # query, score, fetch, prefill, decode, ttft, total


class KVMemory:
    """The language-model stage over a KV memory: prefill chunks, spill blocks, answer questions."""

    def __init__(
        self,
        adapter: DecoderAdapter,
        store: TieredStore,
        *,
        tokenizer=None,
        config: KVMemoryConfig | None = None,
        prompt: PromptFormat | None = None,
        embedder=None,
    ) -> None:
        """``embedder``: an optional text embedder (``space``, ``embed(texts)``, e.g.
        :class:`~.features.MiniLMEmbedder`) giving text blocks a retrieval feature."""
        self.embedder = embedder
        self.adapter = adapter
        self.store = store
        self.tokenizer = tokenizer
        self.config = config or KVMemoryConfig()
        self.prompt = prompt or ChatFormat()
        self.model_id = adapter.model_id

    # ------------------------------------------------------------------ stream lifecycle
    def open(self, stream_id: str, system_prompt=None, *, start_us: int = 0) -> StreamKV:
        """A new stream whose sink is the system prompt (the attention sink of StreamingLLM/ReKV):
        text formatted by the prompt format, or token ids used as they are."""
        state = StreamKV(stream_id=stream_id, model_id=self.model_id)
        ids = self._ids(system_prompt, self.prompt.sink)
        out = self.adapter.forward(self.adapter.embed(ids), torch.arange(len(ids)), capture="keys")
        state.sink = self._block(state, out, torch.arange(len(ids)), 0, len(ids), start_us, start_us, "sink")
        return state

    def prefill_text(self, state: StreamKV, text: str, start_us: int, end_us: int) -> StreamKV:
        """Append text (a transcript segment, a note) covering ``[start_us, end_us]``."""
        return self.prefill_tokens(state, self._tokens(text), start_us, end_us)

    def prefill_tokens(self, state: StreamKV, token_ids, start_us: int, end_us: int) -> StreamKV:
        ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
        if ids.numel() == 0:
            return state
        return self._prefill(state, self.adapter.embed(ids), None, start_us, end_us, "text", ids=ids)

    def prefill_embeds(
        self,
        state: StreamKV,
        embeds: torch.Tensor,
        start_us: int,
        end_us: int,
        *,
        grid: tuple[int, int] | None = None,
        feature: tuple[str, torch.Tensor] | None = None,
    ) -> StreamKV:
        """Append one frame's visual tokens ``(tokens, hidden)`` (already in the LM's embedding space).

        ``grid``: the (rows, cols) of the tokens in row-major order, for mRoPE models (Qwen2.5-VL
        places them at (t, t + row, t + col)); 1-D RoPE models place them in sequence. The frame
        becomes one block. ``feature``: (space, vector), e.g. the frame's pooled visual feature,
        which questions with an example image are compared with.
        """
        if grid is not None and grid[0] * grid[1] != embeds.shape[0]:
            raise ValueError(f"grid {grid} does not match {embeds.shape[0]} tokens")
        return self._prefill(state, embeds, grid, start_us, end_us, "visual", feature=feature)

    # ------------------------------------------------------------------ prefill internals
    def _prefill(self, state, embeds, grid, start_us, end_us, kind, ids=None, feature=None) -> StreamKV:
        if state.sink is None:
            raise ValueError(f"stream {state.stream_id!r} is not open")
        if state.model_id != self.model_id:
            raise BlockMismatch(f"state of model {state.model_id!r} given to {self.model_id!r}")
        if end_us < start_us:
            raise ValueError(f"end_us {end_us} < start_us {start_us}")
        keys, values, base = self.assemble([state.sink, *state.window])
        n = embeds.shape[0]
        out = None
        if grid is not None and self.adapter.mrope:
            rows, cols = grid
            r = torch.arange(rows).repeat_interleave(cols)
            c = torch.arange(cols).repeat(rows)
            pos3 = torch.stack([torch.zeros(n, dtype=torch.int64), r, c]) + base
            out = self.adapter.forward(embeds, pos3, (keys, values), capture=("keys", "queries"))
            positions, span = pos3.max(dim=0).values, max(rows, cols)
            state.window.append(self._block(state, out, positions, base, span, start_us, end_us, kind))
            self._features(state, state.window[-1:], None, n, feature)
        else:
            positions = torch.arange(base, base + n)
            out = self.adapter.forward(embeds, positions, (keys, values), capture=("keys", "queries"))
            step = n if kind == "visual" else self.config.block_tokens
            first = len(state.window)
            for a in range(0, n, step):
                b = min(n, a + step)
                part = _slice(out, a, b)
                t0 = start_us + (end_us - start_us) * a // n
                t1 = start_us + (end_us - start_us) * b // n
                token_ids = ids[a:b] if ids is not None else None
                state.window.append(
                    self._block(state, part, positions[a:b], base + a, b - a, t0, t1, kind, token_ids)
                )
            self._features(state, state.window[first:], ids, step, feature)
        assert out.pre_rope_queries is not None  # captured: capture=("keys", "queries")
        self._observe_queries(state, out.pre_rope_queries)
        self._spill(state)
        return state

    @staticmethod
    def _observe_queries(state: StreamKV, queries: torch.Tensor) -> None:
        """Fold a chunk's pre-RoPE queries (layers, heads, tokens, dim) into the stream's mean."""
        n = queries.shape[2]
        chunk_mean = queries.float().mean(dim=2).cpu()
        if state.query_mean is None:
            state.query_mean, state.query_count = chunk_mean, n
        else:
            total = state.query_count + n
            state.query_mean = state.query_mean + (chunk_mean - state.query_mean) * (n / total)
            state.query_count = total

    def _block(self, state, out, positions, base, span, start_us, end_us, kind, token_ids=None) -> KVBlock:
        mean_keys = out.pre_rope_keys.mean(dim=2) if out.pre_rope_keys is not None else None
        attrs = {"rope": "post", "base": str(int(base)), "span": str(int(span)), "kind": kind}
        if token_ids is not None:  # text blocks keep their token ids: "recompute" answers re-prefill them
            text = ",".join(str(int(t)) for t in token_ids)
            if len(text) < MAX_TOKEN_ATTR:
                attrs["token_ids"] = text
        block = KVBlock(
            model_id=self.model_id,
            stream_id=state.stream_id,
            block_index=state.next_index,
            start_us=int(start_us),
            end_us=int(end_us),
            positions=positions.to(torch.int64).cpu(),
            keys=out.keys,
            values=out.values,
            mean_keys=mean_keys.float().to(out.keys.device) if mean_keys is not None else None,
            attrs=attrs,
        )
        state.next_index += 1
        return block

    def _features(self, state: StreamKV, blocks: list[KVBlock], ids, step: int, feature) -> None:
        if feature is not None:
            for block in blocks:
                state.features[block.block_index] = (feature[0], feature[1].detach().float().cpu())
        elif ids is not None and self.embedder is not None and self.tokenizer is not None:
            texts = [self.tokenizer.decode(ids[a : a + step].tolist()) for a in range(0, len(ids), step)]
            vectors = self.embedder.embed(texts)
            for block, vec in zip(blocks, vectors, strict=True):
                state.features[block.block_index] = (self.embedder.space, vec)

    def _spill(self, state: StreamKV, keep_tokens: int | None = None) -> None:
        keep = self.config.window_tokens if keep_tokens is None else keep_tokens
        while (
            state.window
            and (state.window_tokens > keep)
            and (len(state.window) > 1 or keep_tokens is not None)
        ):
            block = state.window.pop(0)
            self.store.put(block)
            state.index.append(block.summary())

    def spill(self, state: StreamKV, keep_tokens: int = 0) -> StreamKV:
        """Move window blocks to the store until at most ``keep_tokens`` remain (0: all of them),
        e.g. before a stream goes idle."""
        self._spill(state, keep_tokens)
        return state

    def assemble(self, blocks: Sequence[KVBlock]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Blocks laid out at contiguous positions from 0: (keys, values, next position)."""
        pos, ks, vs = 0, [], []
        device = self.adapter.device
        for block in blocks:
            base, span = int(block.attrs["base"]), int(block.attrs["span"])
            ks.append(shift_keys(block.keys.to(device), pos - base, self.adapter.inv_freq))
            vs.append(block.values.to(device))
            pos += span
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2), pos

    def assemble_recomputed(self, blocks: Sequence[KVBlock]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Like :meth:`assemble`, but runs of blocks with token ids are prefilled again over what
        precedes them (the first block, the sink, is always reused as stored)."""
        keys, values, pos = self.assemble(blocks[:1])
        i = 1
        while i < len(blocks):
            run = []
            while i < len(blocks) and "token_ids" in blocks[i].attrs:
                run.append(blocks[i])
                i += 1
            if run:
                ids = torch.tensor([int(t) for b in run for t in b.attrs["token_ids"].split(",")])
                out = self.adapter.forward(
                    self.adapter.embed(ids), torch.arange(pos, pos + len(ids)), (keys, values)
                )
                assert out.keys is not None and out.values is not None  # return_kv (the default)
                keys, values, pos = (
                    torch.cat([keys, out.keys], 2),
                    torch.cat([values, out.values], 2),
                    pos + len(ids),
                )
            if i < len(blocks):  # a block without token ids (a frame): its stored KV, moved
                block = blocks[i]
                base, span = int(block.attrs["base"]), int(block.attrs["span"])
                k = shift_keys(block.keys.to(keys.device), pos - base, self.adapter.inv_freq)
                keys, values = torch.cat([keys, k], 2), torch.cat([values, block.values.to(values.device)], 2)
                pos += span
                i += 1
        return keys, values, pos

    # ------------------------------------------------------------------ questions
    def retrieve(
        self, state: StreamKV, query, *, query_feature: tuple[str, torch.Tensor] | None = None
    ) -> Retrieval:
        """ReKV retrieval: the spilled blocks most relevant to ``query`` (text or token ids), fetched.

        ``query_feature``: (space, vector) compared with the blocks' features of that space (an
        example image's pooled feature); by default the question's text embedding when the memory
        has an embedder.
        """
        if state.sink is None:
            raise ValueError(f"stream {state.stream_id!r} is not open")
        cfg = self.config
        timings: dict[str, float] = {}
        picked: list[int] = []
        scores = torch.zeros(0)
        if state.index and cfg.retrieve_tokens > 0 and cfg.top_k != 0:
            t0 = time.perf_counter()
            keys, values, base = self.assemble([state.sink, *state.window])
            q_ids = self._ids(query, self.prompt.retrieval_query)
            probe = self.adapter.forward(
                self.adapter.embed(q_ids),
                torch.arange(base, base + len(q_ids)),
                (keys, values),
                capture="queries",
                return_kv=False,
            )
            timings["query"] = _ms(t0)
            t1 = time.perf_counter()
            assert probe.pre_rope_queries is not None  # capture="queries"
            query_vec = probe.pre_rope_queries.mean(dim=2).cpu()  # (layers, heads, head_dim)
            if cfg.center_query and state.query_mean is not None:
                query_vec = query_vec - state.query_mean
            scores = combine_layer_scores(
                score_blocks(query_vec, state.mean_keys(), backend=cfg.kernel_backend)
            )
            if query_feature is None and self.embedder is not None and isinstance(query, str):
                query_feature = (self.embedder.space, self.embedder.embed([query])[0])
            if query_feature is not None and cfg.feature_weight:
                space, vec = query_feature
                feats = [state.features.get(s.block_index) for s in state.index]
                vecs = [f[1] if f is not None and f[0] == space else None for f in feats]
                scores = scores + cfg.feature_weight * feature_scores(vec, vecs)
            picked = select_blocks(
                scores, [s.num_tokens for s in state.index], top_k=cfg.top_k, max_tokens=cfg.retrieve_tokens
            )
            timings["score"] = _ms(t1)
        t2 = time.perf_counter()
        blocks, unusable, evidence = self._fetch(state, picked, scores)
        timings["fetch"] = _ms(t2)
        return Retrieval(blocks=blocks, evidence=evidence, unusable=unusable, timings_ms=timings)

    def answer(
        self,
        state: StreamKV,
        question,
        *,
        max_new_tokens: int | None = None,
        query_feature: tuple[str, torch.Tensor] | None = None,
    ) -> Answer:
        """Answer ``question`` (text, or token ids used as they are) from the stream's memory.
        The question is not added to the memory."""
        t0 = time.perf_counter()
        found = self.retrieve(state, question, query_feature=query_feature)
        assert state.sink is not None  # retrieve refuses a stream that is not open
        t3 = time.perf_counter()
        if self.config.context_order == "best_last":
            ranked = sorted(zip(found.evidence, found.blocks, strict=True), key=lambda pair: pair[0].score)
            context = [state.sink, *state.window, *(block for _, block in ranked)]
        else:
            context = [state.sink, *found.blocks, *state.window]
        if self.config.answer_context == "recompute":
            keys, values, base = self.assemble_recomputed(context)
        else:
            keys, values, base = self.assemble(context)
        p_ids = self._ids(question, self.prompt.question)
        out = self.adapter.forward(
            self.adapter.embed(p_ids),
            torch.arange(base, base + len(p_ids)),
            (keys, values),
            logits="last",
            return_kv=False,
        )
        timings = dict(found.timings_ms)
        timings["prefill"] = _ms(t3)
        timings["ttft"] = _ms(t0)
        t4 = time.perf_counter()
        tokens = self._decode(out, base + len(p_ids), max_new_tokens or self.config.max_new_tokens)
        timings["decode"] = _ms(t4)
        timings["total"] = _ms(t0)
        window = (state.window[0].start_us, state.window[-1].end_us) if state.window else None
        return Answer(
            text=self._text(tokens),
            token_ids=tokens,
            evidence=found.evidence,
            window_range_us=window,
            unusable=found.unusable,
            context_tokens=sum(b.num_tokens for b in context) + len(p_ids),
            timings_ms=timings,
        )

    def _fetch(self, state: StreamKV, picked: list[int], scores: torch.Tensor):
        summaries = [state.index[i] for i in picked]
        keys = [s.key for s in summaries]
        tiers = [(self.store.where(k) or ["?"])[0] for k in keys]
        try:
            blocks: list[KVBlock | Exception] = list(self.store.get_many(keys))
        except KVStoreError:
            blocks = []
            for key in keys:
                try:
                    blocks.append(self.store.get(key))
                except KVStoreError as err:
                    blocks.append(err)
        fetched, unusable, evidence = [], [], []
        for i, summary, tier, block in zip(picked, summaries, tiers, blocks, strict=True):
            if isinstance(block, Exception):
                unusable.append((str(summary.key), f"{type(block).__name__}: {block}"))
                continue
            if block.stream_id != state.stream_id or block.model_id != state.model_id:
                unusable.append((str(summary.key), "BlockMismatch: block of another stream or model"))
                continue
            fetched.append(block)
            evidence.append(Evidence(block.block_index, block.start_us, block.end_us, float(scores[i]), tier))
        return fetched, unusable, evidence

    def _decode(self, out, position: int, max_new_tokens: int) -> list[int]:
        eos = self._eos_ids()
        tokens: list[int] = []
        cache = out.cache
        logits = out.logits
        for step in range(max_new_tokens):
            token = int(logits[-1].argmax())
            if token in eos:
                break
            tokens.append(token)
            if step + 1 == max_new_tokens:
                break
            nxt = self.adapter.forward(
                self.adapter.embed(torch.tensor([token])),
                torch.tensor([position]),
                logits="last",
                cache=cache,
                return_kv=False,
            )
            logits, cache, position = nxt.logits, nxt.cache, position + 1
        return tokens

    # ------------------------------------------------------------------ text
    def _ids(self, value, template) -> torch.Tensor:
        """Token ids as given, or ``template(text)`` tokenised."""
        if value is None or isinstance(value, str):
            ids = self._tokens(template(value))
        else:
            ids = torch.as_tensor(value, dtype=torch.int64).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("empty prompt")
        return ids

    def _tokens(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("this KV memory has no tokenizer: use prefill_tokens / prefill_embeds")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.int64)

    def _text(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.adapter.model, "generation_config", None), self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        if self.tokenizer is not None:
            for marker in self.prompt.stop_markers:
                tid = self.tokenizer.convert_tokens_to_ids(marker)
                if isinstance(tid, int) and tid != getattr(self.tokenizer, "unk_token_id", None):
                    ids.add(tid)
        return ids


def _slice(out, a: int, b: int):
    return type(out)(
        keys=out.keys[:, :, a:b],
        values=out.values[:, :, a:b],
        logits=None,
        pre_rope_keys=out.pre_rope_keys[:, :, a:b],
        pre_rope_queries=None,
        cache=None,
    )


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)
