# The Serve image: Ray 2.60 (CUDA) with streamvqa[serve,models] and the application builders
# the RayService's serveConfigV2 names (streamvqa_serve_app:encoder_app / lm_app).
# Build from the repository root:
#   docker build -f docker/serve.Dockerfile -t ghcr.io/streamvqa/serve:0.1.0 .
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamvqa streamvqa
COPY pipelines pipelines
COPY operators operators
COPY schemas schemas
COPY infra infra
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM rayproject/ray:2.60.0-py311-gpu
# torch: the CUDA build of the same version the project pins (CPU build in development).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
COPY docker/constraints.txt /tmp/constraints.txt
COPY --from=build /wheels /wheels
COPY docker/serve/streamvqa_serve_app.py /home/ray/app/streamvqa_serve_app.py
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" torch==2.13.0 \
 && pip install --no-cache-dir -c /tmp/constraints.txt "$(ls /wheels/streamvqa-*.whl)[serve,models]" \
 && rm -rf /wheels /tmp/constraints.txt
ENV PYTHONPATH=/home/ray/app RAY_USAGE_STATS_ENABLED=0
# The image's own non-root user (ray, uid 1000).
USER 1000
HEALTHCHECK --interval=30s --timeout=3s CMD wget -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep -q success || exit 1
