# One image for every role: worker, flower and the itrain CLI, so it installs the [worker] extra
# (numpy, numba, rich, flower). A service that only publishes needs `pip install interaction-trainer`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-cache-dir '.[worker]' && useradd --create-home itrain
USER itrain
# numba caches the compiled SGD kernel here (the installed package is not writable by itrain).
ENV PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/home/itrain/.cache/numba
# Compiled once at build time: a worker then loads it from the cache at start (~0.2 s) instead of
# compiling (~2 s). On a host whose CPU differs from the build host's, the first worker compiles
# again, into the same directory.
RUN python -c "from worker.engine.kernel import warm_up; warm_up()"
CMD ["celery", "-A", "worker", "worker", "--loglevel", "info"]
