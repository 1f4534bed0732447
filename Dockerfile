# bon on a GPU: vLLM samples and scores, bon serves best-of-N over the OpenAI API.
# Not built where bon is developed (no container engine there); CI lints it with hadolint.
#
#   docker build -t bon .
#   docker run --gpus all -p 8000:8000 \
#     -v /path/to/policy:/models/policy:ro -v /path/to/reward_model:/models/reward_model:ro \
#     -v bon-data:/data bon [any bon serve flag, e.g. --api-key KEY]
#
# The CUDA libraries come with vLLM's own torch wheel; the base image needs only to match the driver.
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/bon/bin:$PATH

# Unpinned apt packages: the distribution's security updates should land on every rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY bon ./bon
COPY server ./server
COPY trainers ./trainers
# bon[vllm] pins the vLLM release the engine adapter is tested against; it brings a CUDA torch.
RUN python3 -m venv /opt/bon && /opt/bon/bin/pip install --no-cache-dir '.[vllm]'

RUN useradd --create-home --uid 10001 bon && mkdir -p /models /data && chown bon /data
USER 10001
WORKDIR /data
# Models are mounted read-only under /models; the candidate log lives in /data.
VOLUME ["/models", "/data"]
EXPOSE 8000

# Every bon serve flag is also a BON_ variable, and a flag given to `docker run` wins over these.
ENV BON_ENGINE=vllm \
    BON_REWARD_ENGINE=vllm \
    BON_POLICY=/models/policy \
    BON_REWARD_MODEL=/models/reward_model \
    BON_HOST=0.0.0.0 \
    BON_PORT=8000 \
    BON_SAMPLE_LOG=/data/bon-samples.db \
    HF_HUB_OFFLINE=1

# /ready answers 200 only once both engines are loaded, warmed up and alive (and the candidate log
# commits). The check reads the port from the server's command line, so `docker run ... bon
# --port 9000` is checked on 9000, not on ${BON_PORT}.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-m", "bon.healthcheck"]

ENTRYPOINT ["bon", "serve"]
