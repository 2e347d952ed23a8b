# recmtl model server: serves every ONNX model in /models (mount or COPY them there).
#   docker build -t recmtl-serve . && docker run -p 8000:8000 -v "$PWD/models:/models:ro" recmtl-serve
# Serving needs onnxruntime only: the package is installed without torch (--no-deps + the serve stack).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/recmtl
COPY pyproject.toml README.md ./
COPY recmtl ./recmtl
COPY recmtl_plugins ./recmtl_plugins

RUN pip install --no-cache-dir --no-deps . \
    && pip install --no-cache-dir \
        "onnxruntime==1.22.0" "pyarrow==20.0.0" "numpy==2.2.6" "pluggy==1.6.0" \
        "typer==0.16.0" "tqdm==4.67.1" "starlette==0.47.0" "uvicorn[standard]==0.34.3" "prometheus-client==0.22.1" "orjson==3.10.18" \
    && groupadd --gid 10001 recmtl && useradd --create-home --uid 10001 --gid 10001 recmtl

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/live', timeout=4)"]
ENTRYPOINT ["recmtl", "serve", "/models", "--host", "0.0.0.0", "--port", "8000"]
