"""KV blocks, their keys and their serialisation (no storage involved)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamvqa.operators.kv import (
    BlockCorrupt,
    BlockKey,
    BlockMismatch,
    KVBlock,
    decode_block,
    decode_summary,
    encode_block,
    model_id_from_slug,
    model_slug,
    verify_block,
)
from streamvqa.operators.kv.block import KV_DTYPES

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]


def make_block(
    index: int = 0,
    *,
    stream: str = "cam-1",
    model: str = MODEL,
    dtype: torch.dtype = torch.float16,
    layers: int = 3,
    heads: int = 2,
    tokens: int = 5,
    dim: int = 8,
    seed: int | None = None,
) -> KVBlock:
    g = torch.Generator().manual_seed(index if seed is None else seed)
    keys = torch.randn(layers, heads, tokens, dim, generator=g).to(dtype)
    values = torch.randn(layers, heads, tokens, dim + 2, generator=g).to(dtype)
    return KVBlock(
        model_id=model,
        stream_id=stream,
        block_index=index,
        start_us=index * 2_000_000,
        end_us=index * 2_000_000 + 1_999_999,
        positions=torch.arange(index * tokens, (index + 1) * tokens),
        keys=keys,
        values=values,
        attrs={"rope": "pre"},
    )


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


# -- round trip ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact_for_every_dtype(dtype: torch.dtype) -> None:
    block = make_block(7, dtype=dtype)
    if dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf")]).to(dtype)
        block.keys[0, 0, 0, :4] = special  # before hashing: the block has not been hashed yet
    encoded = encode_block(block)
    back = decode_block(encoded.data, block.key())
    assert back.keys.dtype == dtype and back.values.dtype == dtype
    assert raw(back.keys) == raw(block.keys) and raw(back.values) == raw(block.values)
    assert raw(back.mean_keys) == raw(block.mean_keys) and back.positions.tolist() == block.positions.tolist()
    assert (back.model_id, back.stream_id, back.block_index) == (MODEL, "cam-1", 7)
    assert (back.start_us, back.end_us, dict(back.attrs)) == (block.start_us, block.end_us, {"rope": "pre"})
    assert back.key() == block.key() and back.equal(block)
    summary = decode_summary(encoded.summary, block.key())
    assert raw(summary.mean_keys) == raw(block.mean_keys)
    assert (summary.num_tokens, summary.first_position, summary.last_position) == (5, 35, 39)
    assert summary.block_hash == block.content_hash()


def test_bytes_are_a_standard_safetensors_file() -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    block = make_block(3, dtype=torch.bfloat16)
    encoded = encode_block(block)
    tensors = safetensors_torch.load(encoded.data)
    assert set(tensors) == {"keys", "values", "mean_keys", "positions"}
    assert tensors["keys"].dtype == torch.bfloat16 and raw(tensors["keys"]) == raw(block.keys)
    (header_len,) = struct.unpack("<Q", encoded.data[:8])
    metadata = json.loads(encoded.data[8 : 8 + header_len])["__metadata__"]
    assert metadata["stream_id"] == "cam-1" and metadata["checksum"] == block.content_hash()
    assert (8 + header_len) % 8 == 0  # data aligned


def test_mean_keys_are_the_float32_token_mean_of_the_keys() -> None:
    block = make_block(1, dtype=torch.bfloat16, tokens=7)
    assert block.mean_keys.dtype == torch.float32 and block.mean_keys.shape == (3, 2, 8)
    torch.testing.assert_close(block.mean_keys, block.keys.float().mean(dim=2))


def test_from_layers_stacks_per_layer_tensors() -> None:
    ref = make_block(2)
    block = KVBlock.from_layers(
        [ref.keys[i] for i in range(3)],
        [ref.values[i] for i in range(3)],
        model_id=MODEL,
        stream_id="cam-1",
        block_index=2,
        start_us=ref.start_us,
        end_us=ref.end_us,
        positions=ref.positions,
        attrs={"rope": "pre"},
    )
    assert block.key() == ref.key()
    k, v = block.layer(1)
    assert torch.equal(k, ref.keys[1]) and torch.equal(v, ref.values[1])


def test_a_block_never_pins_the_cache_it_was_sliced_from() -> None:
    cache = torch.randn(3, 2, 1000, 8, dtype=torch.float16)
    block = KVBlock(MODEL, "cam-1", 0, 0, 1, torch.arange(5), cache[:, :, 10:15], cache[:, :, 10:15])
    for t in block.tensors().values():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert block.nbytes == 2 * (3 * 2 * 5 * 8 * 2) + 3 * 2 * 8 * 4 + 5 * 8


@pytest.mark.parametrize(
    "change",
    [
        {"stream_id": "cam-2"},
        {"model_id": "other/model"},
        {"block_index": 8},
        {"start_us": 1},
        {"attrs": {"rope": "post"}},
    ],
)
def test_content_hash_covers_every_field(change: dict) -> None:
    base = dict(
        model_id=MODEL,
        stream_id="cam-1",
        block_index=7,
        start_us=0,
        end_us=10,
        positions=torch.arange(5),
        keys=torch.ones(1, 1, 5, 4),
        values=torch.ones(1, 1, 5, 4),
        attrs={"rope": "pre"},
    )
    assert KVBlock(**base).content_hash() != KVBlock(**{**base, **change}).content_hash()


def test_content_hash_covers_every_tensor_bit_dtype_and_shape() -> None:
    keys = torch.zeros(1, 1, 4, 4)
    block = KVBlock(MODEL, "cam-1", 0, 0, 1, torch.arange(4), keys, keys)
    flipped = keys.clone()
    flipped.view(torch.int32)[0, 0, 3, 3] ^= 1  # one bit of one value (the mean key barely moves)
    other = KVBlock(MODEL, "cam-1", 0, 0, 1, torch.arange(4), flipped, keys, mean_keys=block.mean_keys)
    assert other.content_hash() != block.content_hash()
    reshaped = KVBlock(MODEL, "cam-1", 0, 0, 1, torch.arange(2), keys.view(1, 1, 2, 8), keys.view(1, 1, 2, 8))
    assert reshaped.content_hash() != block.content_hash()
    assert block.to("cpu", pin_memory=False).content_hash() == block.content_hash()
    assert make_block(0).content_hash() == make_block(0).content_hash()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keys": torch.zeros(2, 5, 8)}, "layers, kv_heads"),
        ({"values": torch.zeros(3, 2, 4, 8)}, "disagree"),
        ({"values": torch.zeros(3, 2, 5, 8, dtype=torch.float32)}, "dtype"),
        (
            {
                "keys": torch.zeros(3, 2, 5, 8, dtype=torch.int32),
                "values": torch.zeros(3, 2, 5, 8, dtype=torch.int32),
            },
            "dtype",
        ),
        ({"positions": torch.arange(4)}, "positions"),
        ({"positions": torch.arange(5, dtype=torch.int32)}, "positions"),
        ({"mean_keys": torch.zeros(3, 2, 8, dtype=torch.float16)}, "mean_keys"),
        ({"end_us": -1}, "end_us"),
        ({"stream_id": "../other"}, "stream id"),
        ({"stream_id": "a/b"}, "stream id"),
        ({"model_id": ""}, "model id"),
        ({"block_index": -1}, "block_index"),
        ({"attrs": {"bad key!": "x"}}, "attrs"),
    ],
)
def test_invalid_blocks_are_refused(kwargs: dict, message: str) -> None:
    base = dict(
        model_id=MODEL,
        stream_id="cam-1",
        block_index=0,
        start_us=0,
        end_us=1,
        positions=torch.arange(5),
        keys=torch.zeros(3, 2, 5, 8, dtype=torch.float16),
        values=torch.zeros(3, 2, 5, 8, dtype=torch.float16),
    )
    with pytest.raises(ValueError, match=message):
        KVBlock(**{**base, **kwargs})


# -- corruption ------------------------------------------------------------------------
def _data_start(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def test_every_flipped_byte_of_the_tensor_data_is_detected() -> None:
    block = make_block(4, tokens=2, dim=4, layers=1)
    data = encode_block(block).data
    for position in range(_data_start(data), len(data)):
        corrupt = bytearray(data)
        corrupt[position] ^= 0x01
        with pytest.raises(BlockCorrupt, match="content hash mismatch"):
            decode_block(bytes(corrupt))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(min_value=0), mask=st.integers(min_value=1, max_value=255))
def test_a_flipped_byte_anywhere_is_refused_or_harmless(position: int, mask: int) -> None:
    block = make_block(4, tokens=2, dim=4, layers=1)
    data = bytearray(encode_block(block).data)
    data[position % len(data)] ^= mask
    try:
        back = decode_block(bytes(data), block.key())
    except BlockCorrupt:
        return
    # Only header whitespace (JSON padding) can change without changing the content.
    assert back.equal(block)


def test_truncated_bytes_are_refused_at_every_length() -> None:
    data = encode_block(make_block(5, tokens=2, dim=4, layers=1)).data
    for length in range(len(data)):
        with pytest.raises(BlockCorrupt):
            decode_block(data[:length])
    with pytest.raises(BlockCorrupt, match="trailing"):
        decode_block(data + b"\0")


@pytest.mark.parametrize(
    "garbage", [b"", b"\x00" * 8, b"PK\x03\x04" + b"\0" * 64, b"\xff" * 64, json.dumps({}).encode()]
)
def test_foreign_bytes_are_refused(garbage: bytes) -> None:
    with pytest.raises(BlockCorrupt):
        decode_block(garbage)


def test_a_summary_is_not_a_block_and_vice_versa() -> None:
    encoded = encode_block(make_block(1))
    with pytest.raises(BlockCorrupt, match="format"):
        decode_block(encoded.summary)
    with pytest.raises(BlockCorrupt, match="format"):
        decode_summary(encoded.data)


def test_a_block_of_stream_a_is_refused_under_a_key_of_stream_b() -> None:
    block_a = make_block(3, stream="stream-a")
    encoded = encode_block(block_a)
    key_a = block_a.key()
    crafted = BlockKey("stream-b", key_a.model_id, key_a.block_index, key_a.hash16)
    with pytest.raises(BlockMismatch, match="stream-a"):
        decode_block(encoded.data, crafted)
    with pytest.raises(BlockMismatch):
        verify_block(encoded.data, crafted)
    with pytest.raises(BlockMismatch):
        decode_summary(encoded.summary, crafted)
    for other in (
        BlockKey("stream-a", "other-model", 3, key_a.hash16),
        BlockKey("stream-a", key_a.model_id, 4, key_a.hash16),
        BlockKey("stream-a", key_a.model_id, 3, "0" * 16),
    ):
        with pytest.raises(BlockMismatch):
            decode_block(encoded.data, other)
    assert decode_block(encoded.data, key_a).equal(block_a)


def test_a_block_rewritten_to_claim_another_stream_fails_its_checksum() -> None:
    data = encode_block(make_block(3, stream="stream-a")).data
    forged = data.replace(b'"stream_id":"stream-a"', b'"stream_id":"stream-b"')
    assert forged != data
    with pytest.raises(BlockCorrupt, match="content hash mismatch"):
        decode_block(forged)


# -- keys ------------------------------------------------------------------------------
def test_key_layout() -> None:
    key = make_block(12).key()
    assert key.path == f"streams/cam-1/kv/HuggingFaceTB_2fSmolLM2-135M-Instruct/0000000012-{key.hash16}"
    assert key.summary_path == key.path + ".mean"
    assert BlockKey.parse(key.path) == key


@pytest.mark.parametrize(
    "path",
    [
        "streams/cam-1/kv/m/12-0123456789abcdef",  # not zero-padded
        "streams/cam-1/kv/m/0000000012-0123456789ABCDEF",  # upper-case hash
        "streams/cam-1/kv/m/0000000012-0123456789abcdef.mean",  # a summary
        "streams/../kv/m/0000000012-0123456789abcdef",
        "streams/cam-1/frames/m/0000000012-0123456789abcdef",
        "streams/cam-1/kv/a/b/0000000012-0123456789abcdef",
        "streams/cam-1/kv/a_2Fb/0000000012-0123456789abcdef",  # non-canonical escape
        "streams/cam-1/kv/.x/0000000012-0123456789abcdef",
    ],
)
def test_only_canonical_block_keys_parse(path: str) -> None:
    with pytest.raises(ValueError):
        BlockKey.parse(path)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=20).filter(str.isprintable))  # 20 x 4 UTF-8 bytes x 3 <= 240
def test_model_slugs_are_reversible_and_path_safe(model_id: str) -> None:
    slug = model_slug(model_id)
    assert model_id_from_slug(slug) == model_id
    assert "/" not in slug and slug not in (".", "..") and not slug.startswith(".")
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in slug)


def test_model_ids_too_long_for_a_path_component_are_refused() -> None:
    model_slug("m" * 200)
    with pytest.raises(ValueError, match="too long"):
        model_slug("/" * 81)
    with pytest.raises(ValueError):
        model_slug("m" * 201)


def test_distinct_model_ids_never_share_a_slug() -> None:
    ids = ["a/b", "a_b", "a_2fb", "a-b", "a.b", "A/b", ".hidden", "_2ehidden", "..", "x/../y"]
    assert len({model_slug(i) for i in ids}) == len(ids)


def test_dtypes_cover_what_models_use() -> None:
    assert {torch.float16, torch.bfloat16, torch.float32} <= KV_DTYPES
