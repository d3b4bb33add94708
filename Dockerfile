# The pixelpipe image: the SDK, the CLI and (with the processors) the workers.
FROM python:3.11-slim
WORKDIR /app
COPY requirements.lock .
RUN pip install --no-cache-dir --no-deps -r requirements.lock
COPY . .
RUN pip install --no-cache-dir --no-deps .
ENV HF_HUB_OFFLINE=1
ENTRYPOINT ["pixelpipe"]
