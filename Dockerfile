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

# onnxruntime 1.32 refuses external-data paths outside the model's folder (1.22 followed them); recmtl itself
# refuses any model with external data before onnxruntime opens it (recmtl/serving/modelfile.py). The pins are
# the versions the test suite runs.
RUN pip install --no-cache-dir --no-deps . \
    && pip install --no-cache-dir \
        "onnxruntime==1.32.0" "pyarrow==26.0.1" "numpy==2.4.6" "pluggy==1.7.0" \
        "typer==0.29.2" "tqdm==4.70.1" "starlette==1.10.0" "uvicorn[standard]==0.54.0" "prometheus-client==0.26.0" "orjson==3.13.0" \
    && groupadd --gid 10001 recmtl && useradd --create-home --uid 10001 --gid 10001 recmtl

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/live', timeout=4)"]
ENTRYPOINT ["recmtl", "serve", "/models", "--host", "0.0.0.0", "--port", "8000"]
