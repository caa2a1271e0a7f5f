# dsft on NVIDIA GPUs: PyTorch's CUDA devel image (nvcc, for flash-attn and DeepSpeed's JIT-built
# ops), dsft with the flash extra, a non-root user, and `deepspeed launch` as the entrypoint.
#   docker build -t dsft .
#   docker run --gpus all --ipc=host -v /models:/models -v "$PWD/outputs:/opt/dsft/outputs" \
#       dsft recipes/llama7b_lora.yaml model.name_or_path=/models/Llama-2-7b-hf
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel

LABEL org.opencontainers.image.title="dsft" \
      org.opencontainers.image.description="Parameter-efficient fine-tuning of LLaMA-scale models on DeepSpeed ZeRO, with 4-bit bases" \
      org.opencontainers.image.licenses="Apache-2.0"

# flash-attn compiles its CUDA kernels when no prebuilt wheel matches the image's torch: MAX_JOBS
# bounds the parallel nvcc processes (each can take several GB of memory).
ARG MAX_JOBS=4
# hadolint ignore=DL3064  # flagged for "TOKEN" in TOKENIZERS_PARALLELISM; it holds no secret
ENV PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/dsft
COPY pyproject.toml README.md constraints.txt ./
COPY dsft/ dsft/
# The image's CUDA torch stays: constraints.txt pins the CPU build CI tests with, so its torch line
# is dropped and every other package keeps its tested version. flash-attn's build imports torch,
# so it runs without build isolation, and its build tools are installed first.
RUN grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt "setuptools>=68" wheel packaging ninja psutil \
 && MAX_JOBS="$MAX_JOBS" pip install --no-build-isolation -c /tmp/constraints.txt ".[flash]" \
 && python -c "import dsft, deepspeed, bitsandbytes, flash_attn"
COPY launch/ launch/
COPY recipes/ recipes/
COPY ds_configs/ ds_configs/

# Runs as an unprivileged user; outputs/ (mount a host directory there) is the one place it writes
# besides its home (Hugging Face, Triton and DeepSpeed-op caches).
RUN useradd --create-home --uid 1000 --user-group dsft \
 && mkdir outputs \
 && chown dsft:dsft outputs
# numeric, so that runtimes (Kubernetes' runAsNonRoot) can tell it is not root
USER 1000:1000

# A training run is a batch job, not a service: nothing to probe.
HEALTHCHECK NONE
# `docker run dsft RECIPE [key.sub=value ...]` is `deepspeed launch RECIPE ...` on every visible GPU
ENTRYPOINT ["deepspeed", "launch"]
CMD ["recipes/tiny_lora.yaml"]
