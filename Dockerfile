# The processor image. CPU torch by default; for GPU nodes build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /app
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY models ./models
COPY schemas ./schemas
RUN pip install --no-cache-dir '.[api]' && useradd --system --uid 10001 pipeline
USER pipeline
EXPOSE 8000 9100
ENTRYPOINT ["pipeline"]
# inside a container, 127.0.0.1 (the default) is unreachable from the published port
CMD ["run", "--metrics-port", "9100", "--host", "0.0.0.0"]
