# One image for every role: worker, flower and the itrain CLI.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-cache-dir . && useradd --create-home itrain
USER itrain
ENV PYTHONUNBUFFERED=1
CMD ["celery", "-A", "worker", "worker", "--loglevel", "info"]
