# Kiln images. Two targets from one file:
#   docker build --target api    -t kiln-api .     # slim: REST + gRPC + dashboard (CPU torch for submit-time checks)
#   docker build --target worker -t kiln-worker .  # CUDA base: Celery worker running the compiler stages on GPUs
# Both run as an unprivileged user and read all configuration from KILN_* variables (see README).

ARG PYTHON_VERSION=3.11
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

# --- generated gRPC stubs (never committed; built from proto/) -------------------------------
FROM python:${PYTHON_VERSION}-slim AS proto
WORKDIR /src
RUN pip install --no-cache-dir "grpcio-tools>=1.66" "protobuf>=5.27"
COPY proto/ proto/
COPY service/__init__.py service/__init__.py
COPY service/api/gen_proto.py service/api/gen_proto.py
RUN touch service/api/__init__.py && python -m service.api.gen_proto

# --- API: slim Python, CPU-only torch ----------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS api
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    KILN_STORAGE=/data KILN_HOST=0.0.0.0 KILN_PORT=8080 KILN_GRPC_PORT=50051
WORKDIR /app
RUN useradd --create-home --uid 10001 kiln && mkdir -p /data && chown kiln /data
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY service/ service/
COPY proto/ proto/
COPY --from=proto /src/service/api/grpc_gen/ service/api/grpc_gen/
RUN pip install -e ".[api]"
RUN python -m compileall -q -j 0 /app/service
USER kiln
EXPOSE 8080 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=5 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2).status != 200)"
# Listening beyond loopback: the server refuses to start unless KILN_API_KEYS / KILN_API_KEYS_FILE is set.
CMD ["kiln", "serve", "--no-worker"]

# --- worker: CUDA runtime, CUDA torch, optional ONNX backend --------------------------------------
FROM ${CUDA_IMAGE} AS worker
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    KILN_STORAGE=/data HF_HUB_DISABLE_TELEMETRY=1
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
RUN useradd --create-home --uid 10001 kiln && mkdir -p /data && chown kiln /data
RUN pip install --index-url https://download.pytorch.org/whl/cu128 "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY service/ service/
COPY proto/ proto/
COPY --from=proto /src/service/api/grpc_gen/ service/api/grpc_gen/
RUN pip install -e ".[worker,hf,gpu]"
# Bytecode compiled now: PYTHONDONTWRITEBYTECODE keeps the running worker from writing it, and without it
# every fresh engine process compiles torch._dynamo / _inductor / sympy / Kiln from source again
# (~5 s of an 8B engine's first token on the H200, benchmarks/README-engine.md).
RUN python -m compileall -q -j 0 /app/service /opt/venv/lib
USER kiln
# One worker process per GPU set; it advertises build.<sm> queues for the GPUs it sees.
CMD ["kiln", "worker", "--concurrency", "1"]
