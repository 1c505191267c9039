"""Model stages on Ray Serve vs in-process, replica loss, retries (issue #7).

Tiny random-weight models: a Llama saved with ``save_pretrained`` (the LM stage) and a small
STC-cached ViT (the encoder stage). The Ray cluster is started once per run by
:mod:`streamvqa.operators.serve.local` and stopped at the end; the fixture checks that no
process of it is left.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from streamvqa.operators.serve.handlers import (
    FrameBatch,
    LMRequest,
    LocalEncoderHandler,
    LocalLMHandler,
    RemoteEncoderHandler,
    RemoteLMHandler,
    RemoteStageError,
    ServeClient,
    ServeClientSettings,
    _waves,
    call_lm_stage,
    client_settings,
    handler_from_settings,
)
from streamvqa.operators.serve.stages import (
    EncoderStage,
    EncoderStageConfig,
    LMStage,
    LMStageConfig,
    StageError,
    StoreConfig,
)
from tests.numerics import DINOV2, assert_reordered_close
from tests.tiny_models import VOCAB, tiny_llama

MEMORY = {"window_tokens": 20, "block_tokens": 10, "retrieve_tokens": 40, "max_new_tokens": 6}
STC = {"cache_interval": 3, "update_token_ratio": 0.5}


def new_stream(tag: str = "s") -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 2, (n,), generator=g).tolist()


def frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 40, 48, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory) -> str:
    from transformers.utils import logging as hf_logging

    path = tmp_path_factory.mktemp("tiny-llama")
    hf_logging.disable_progress_bar()
    tiny_llama().save_pretrained(path)
    return str(path)


def lm_config(path: str, store: StoreConfig | None = None) -> LMStageConfig:
    return LMStageConfig(model_path=path, model_id="tiny-llama", memory=MEMORY, store=store or StoreConfig())


def enc_config(store: StoreConfig | None = None) -> EncoderStageConfig:
    return EncoderStageConfig(stc=STC, store=store or StoreConfig())


def lm_script(stream: str, chunks: int, question_seed: int = 99) -> list[LMRequest]:
    reqs = [LMRequest("open", stream, system_prompt=tokens(4, 0))]
    for i in range(chunks):
        reqs.append(
            LMRequest(
                "prefill",
                stream,
                seq=i + 1,
                start_us=i * 1000,
                end_us=i * 1000 + 999,
                tokens=tokens(10, i + 1),
            )
        )
    reqs.append(
        LMRequest(
            "answer", stream, query_id=f"q-{stream}", question=tokens(5, question_seed), after_seq=chunks
        )
    )
    return reqs


def same_answer(a: dict, b: dict) -> None:
    assert a["token_ids"] == b["token_ids"]
    assert [e["block_index"] for e in a["evidence"]] == [e["block_index"] for e in b["evidence"]]
    assert [e["score"] for e in a["evidence"]] == pytest.approx([e["score"] for e in b["evidence"]], abs=1e-4)
    assert a["window_range_us"] == b["window_range_us"] and a["context_tokens"] == b["context_tokens"]


# ---------------------------------------------------------------------- without Ray
def test_waves_keep_each_streams_order_and_mix_streams() -> None:
    items = ["a1", "b1", "a2", "c1", "a3", "b2"]
    waves = _waves(items, lambda s: s[0])
    assert [[items[i] for i in w] for w in waves] == [["a1", "b1", "c1"], ["a2", "b2"], ["a3"]]


def test_handler_from_settings_picks_local_or_remote(tiny_lm_path) -> None:
    assert isinstance(handler_from_settings("encoder", enc_config()), LocalEncoderHandler)
    assert isinstance(handler_from_settings("lm", lm_config(tiny_lm_path)), LocalLMHandler)
    remote = ServeClientSettings(mode="remote", address="127.0.0.1:1")
    from streamvqa.settings import Settings

    assert client_settings(Settings(data_dir=Path("/x"))).data_dir == "/x"
    assert client_settings({"mode": "remote"}).mode == "remote"
    assert isinstance(handler_from_settings("encoder", enc_config(), remote), RemoteEncoderHandler)
    assert isinstance(handler_from_settings("lm", lm_config(tiny_lm_path), remote), RemoteLMHandler)


def test_lm_stage_applies_a_retried_prefill_once(tiny_lm_path) -> None:
    stage = LMStage(lm_config(tiny_lm_path))
    stream = new_stream()
    stage.open(stream, tokens(4, 0))
    first = stage.prefill(stream, 1, 0, 999, tokens=tokens(10, 1))
    again = stage.prefill(stream, 1, 0, 999, tokens=tokens(10, 1))
    assert first["applied"] and not again["applied"] and again["window_tokens"] == first["window_tokens"]
    with pytest.raises(StageError, match="not open"):
        stage.answer(new_stream(), "q1", tokens(3, 0))
    assert stage.open(stream, tokens(4, 0)) == {"stream_id": stream, "seq": 1, "opened": False}
    assert stage.open(stream, tokens(4, 0), reset=True)["opened"]


def test_encoder_stage_answers_a_repeated_call_the_same() -> None:
    """A client that timed out and retried while its first call ran sends the call twice: the
    second gets the first's result, and the stream's cache does not move on twice."""
    stage, ref = EncoderStage(enc_config()), EncoderStage(enc_config())
    stream, f = new_stream(), frames(9, 2)
    stage.encode(stream, f[:4], 0)
    first = stage.encode(stream, f[4:7], 4)
    again = stage.encode(stream, f[4:7], 4)
    np.testing.assert_array_equal(first["patch_tokens"], again["patch_tokens"])
    assert stage.encoder.state(stream).frames == 7
    last = stage.encode(stream, f[7:], 7)
    want = [ref.encode("ref", f[:4], 0), ref.encode("ref", f[4:7], 4), ref.encode("ref", f[7:], 7)][-1]
    np.testing.assert_array_equal(last["patch_tokens"], want["patch_tokens"])


class _DeadResponse:
    def result(self, timeout_s=None):
        import ray.exceptions

        raise ray.exceptions.ActorDiedError()


def test_remote_calls_retry_then_fail_naming_the_query() -> None:
    client = object.__new__(ServeClient)  # no cluster: every call hits a dead replica
    client.settings = ServeClientSettings(mode="remote", attempts=3, backoff_s=0.01)
    client.app, client.stateful = "streamvqa-lm", True
    from streamvqa.operators.serve.handlers import _retryable

    client.retryable = _retryable()
    submitted = []
    client.submit = lambda *a: submitted.append(a) or _DeadResponse()
    req = LMRequest("answer", "cam-1", query_id="q-42", question=[1, 2])
    with pytest.raises(RemoteStageError, match=r"query 'q-42' of stream 'cam-1'.*after 3 attempts"):
        client.call_all([RemoteLMHandler.call_of(req)])
    assert len(submitted) == 3


@pytest.mark.stack
def test_encoder_stage_snapshot_restores_the_cache_exactly(stack_settings, endpoints) -> None:
    store = StoreConfig.from_settings(stack_settings, endpoints)
    a, b = EncoderStage(enc_config(store)), EncoderStage(enc_config(store))
    stream, f = new_stream(), frames(7, 1)
    a.encode(stream, f[:4], 0)  # snapshot after every call
    out_b = b.encode(stream, f[4:], 4)  # b has no cache in memory: restored from the store
    out_a = a.encode(stream, f[4:], 4)
    np.testing.assert_array_equal(out_a["patch_tokens"], out_b["patch_tokens"])


# ------------------------------------------------------------------------- on Serve
@pytest.fixture(scope="session")
def serve_cluster(tmp_path_factory, stack_settings, endpoints, tiny_lm_path):
    """A local Ray + Serve with the encoder (1 replica) and the LM (2 replicas) deployed."""
    from streamvqa.operators.serve import deployments, local

    data_dir = tmp_path_factory.mktemp("serve")
    store = StoreConfig.from_settings(stack_settings, endpoints)
    state = local.up(data_dir, num_cpus=4)
    try:
        local.connect(data_dir)
        local.start_serve()
        quick = {"num_cpus": 0.5, "health_check_period_s": 1.0, "graceful_shutdown_timeout_s": 1.0}
        config = deployments.ServeConfig(
            encoder=enc_config(store),
            lm=lm_config(tiny_lm_path, store),
            encoder_deploy=deployments.DeploySettings(num_replicas=1, max_batch_size=8, **quick),
            lm_deploy=deployments.DeploySettings(num_replicas=2, **quick),
        )
        deployments.deploy(config)
        yield {
            "data_dir": data_dir,
            "store": store,
            "state": state,
            "client": ServeClientSettings(mode="remote", data_dir=str(data_dir), backoff_s=0.5, attempts=6),
        }
    finally:
        stopped = local.down(data_dir)
        assert stopped, "down() found no process to stop"
        assert local.our_pids(state) == [], "Ray processes left behind"


@pytest.mark.slow
@pytest.mark.stack
def test_serve_and_in_process_give_the_same_outputs(serve_cluster, tiny_lm_path) -> None:
    store, client = serve_cluster["store"], serve_cluster["client"]
    local_lm, remote_lm = LocalLMHandler(lm_config(tiny_lm_path, store)), RemoteLMHandler(client)
    s_local, s_remote, s_remote2 = new_stream("loc"), new_stream("rem"), new_stream("rem")
    local_out = local_lm.run_inference(lm_script(s_local, 5), local_lm.load_model())
    # Two streams interleaved in one batch on the Serve side.
    script = [r for pair in zip(lm_script(s_remote, 5), lm_script(s_remote2, 5), strict=True) for r in pair]
    remote_out = remote_lm.run_inference(script, remote_lm.load_model())
    answers = [p.inference for p in remote_out if p.example.kind == "answer"]
    assert [a["query_id"] for a in answers] == [f"q-{s_remote}", f"q-{s_remote2}"]
    for a in answers:
        same_answer(a, local_out[-1].inference)

    local_enc, remote_enc = LocalEncoderHandler(enc_config(store)), RemoteEncoderHandler(client)
    f = frames(8, 2)
    e_local, e_remote = new_stream("loc"), new_stream("rem")
    batches = [(f[:3], 0), (f[3:5], 3), (f[5:], 5)]
    lo = local_enc.run_inference([FrameBatch(e_local, x, i) for x, i in batches], local_enc.load_model())
    ro = remote_enc.run_inference([FrameBatch(e_remote, x, i) for x, i in batches], remote_enc.load_model())
    for a, b in zip(lo, ro, strict=True):
        assert_reordered_close(
            a.inference["patch_tokens"], b.inference["patch_tokens"], **DINOV2
        )  # a replica may run other threads
        assert_reordered_close(
            a.inference["pooled"], b.inference["pooled"], **DINOV2
        )  # a replica may run other threads
        assert a.inference["grid"] == b.inference["grid"]


def _kill_replica_of(app: str, stream: str) -> str:
    import ray
    from ray import serve

    info = serve.get_app_handle(app).options(multiplexed_model_id=stream).info.remote().result(timeout_s=30)
    ray.kill(ray.get_actor(info["actor_name"], namespace="serve"), no_restart=True)
    return info["actor_name"]


@pytest.mark.slow
@pytest.mark.stack
def test_a_killed_replica_is_replaced_and_the_stream_recovered(serve_cluster, tiny_lm_path) -> None:
    from ray import serve

    store, client = serve_cluster["store"], serve_cluster["client"]
    lm = RemoteLMHandler(client)
    remote = lm.load_model()
    stream, reference = new_stream("kill"), new_stream("ref")
    script = lm_script(stream, 8)
    lm.run_inference(script[:5], remote)  # open + 4 chunks, then the replica dies
    killed = _kill_replica_of("streamvqa-lm", stream)
    out = lm.run_inference(script[5:], remote)
    stage = LMStage(lm_config(tiny_lm_path, store))  # the uninterrupted run, in-process
    expected = [call_lm_stage(stage, r) for r in lm_script(reference, 8)][-1]
    same_answer(out[-1].inference, expected)
    assert all(p.inference.get("applied", True) for p in out[:-1])

    enc = RemoteEncoderHandler(client)
    model = enc.load_model()
    stream_e, f = new_stream("kill"), frames(9, 3)
    first = enc.run_inference([FrameBatch(stream_e, f[:4], 0)], model)
    killed_enc = _kill_replica_of("streamvqa-encoder", stream_e)
    rest = enc.run_inference([FrameBatch(stream_e, f[4:7], 4), FrameBatch(stream_e, f[7:], 7)], model)
    whole = EncoderStage(enc_config())
    exp = [whole.encode("ref", f[:4], 0), whole.encode("ref", f[4:7], 4), whole.encode("ref", f[7:], 7)]
    for got, want in zip([*first, *rest], exp, strict=True):
        assert_reordered_close(
            got.inference["patch_tokens"], want["patch_tokens"], **DINOV2
        )  # a replica may run other threads
    # Serve replaced the dead replicas: calls land on live ones, none of them the killed actors.
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        counts = [
            d.replica_states.get("RUNNING", 0)
            for app in ("streamvqa-lm", "streamvqa-encoder")
            for d in serve.status().applications[app].deployments.values()
        ]
        if counts == [2, 1]:
            break
        time.sleep(0.5)
    assert counts == [2, 1], f"replicas not replaced: {counts}"
    for app, dead in (("streamvqa-lm", killed), ("streamvqa-encoder", killed_enc)):
        info = (
            serve.get_app_handle(app).options(multiplexed_model_id=stream).info.remote().result(timeout_s=60)
        )
        assert info["actor_name"] != dead


@pytest.mark.slow
@pytest.mark.stack
def test_remote_errors_are_clear_and_name_the_query(serve_cluster) -> None:
    client = serve_cluster["client"]
    lm = RemoteLMHandler(client)
    model = lm.load_model()
    with pytest.raises(StageError, match="is not open"):
        lm.run_inference([LMRequest("answer", new_stream(), query_id="q-7", question=[1, 2])], model)
    stream = new_stream()
    lm.run_inference(lm_script(stream, 1)[:2], model)
    bad = LMRequest("answer", stream, query_id="q-9", question=[VOCAB + 1000])  # the model raises
    with pytest.raises(RemoteStageError, match=rf"query 'q-9' of stream '{stream}'.*not retried.*IndexError"):
        lm.run_inference([bad], model)
    impatient = RemoteLMHandler(
        client.model_copy(update={"call_timeout_s": 0.001, "attempts": 2, "backoff_s": 0})
    )
    question = LMRequest("answer", stream, query_id="q-8", question=[1, 2, 3])
    with pytest.raises(RemoteStageError, match=rf"query 'q-8' of stream '{stream}'.*after 2 attempts"):
        impatient.run_inference([question], impatient.load_model())


def test_serve_status_with_nothing_running(tmp_path: Path) -> None:
    from streamvqa.operators.serve import local

    assert local.status(tmp_path) == {"running": False}
    assert local.down(tmp_path) == []


def _pipeline_pooled(handler, elements: list[FrameBatch], out_dir: Path) -> dict[str, np.ndarray]:
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    def write(result) -> None:
        tag = result.example.stream_id.split("-")[-1]
        np.save(out_dir / f"{tag}.npy", result.inference["pooled"])

    out_dir.mkdir()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = p | beam.Create(elements) | RunInference(handler) | beam.Map(write)
    return {f.stem: np.load(f) for f in out_dir.glob("*.npy")}


@pytest.mark.slow
@pytest.mark.stack
def test_a_beam_pipeline_gives_the_same_results_with_either_handler(serve_cluster, tmp_path: Path) -> None:
    # One element per stream: the order Beam delivers them in does not matter.
    store, client = serve_cluster["store"], serve_cluster["client"]
    elements = {
        tag: [FrameBatch(f"{tag}-{uuid.uuid4().hex[:6]}-{k}", frames(3, 10 + k), 0) for k in range(3)]
        for tag in ("loc", "rem")
    }
    local = _pipeline_pooled(
        handler_from_settings("encoder", enc_config(store)), elements["loc"], tmp_path / "l"
    )
    remote = _pipeline_pooled(
        handler_from_settings("encoder", enc_config(store), client), elements["rem"], tmp_path / "r"
    )
    assert sorted(local) == sorted(remote) == ["0", "1", "2"]
    for tag in local:
        assert_reordered_close(local[tag], remote[tag], **DINOV2)  # a replica may run other threads
