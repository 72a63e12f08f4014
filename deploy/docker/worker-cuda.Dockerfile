# syntax=docker/dockerfile:1
# The GPU worker: the `cuda` build of scripts/build-cuda.sh on NVIDIA's CUDA 13.0 runtime image.
# Build from the repository root:
#
#   docker build -f deploy/docker/worker-cuda.Dockerfile -t prunesweep-worker:cuda-sm90 .
#   docker build -f deploy/docker/worker-cuda.Dockerfile --build-arg CUDA_COMPUTE_CAP=80 \
#       -t prunesweep-worker:cuda-sm80 .            # A100 (one image per GPU kind)
#
# Run (NVIDIA Container Toolkit on the host; the driver's libcuda.so.1 comes from it):
#
#   docker run --rm --gpus all prunesweep-worker:cuda-sm90 doctor --device cuda:0
#
# worker-cuda.Dockerfile.dockerignore (next to this file; BuildKit reads it) keeps target/ and
# results/ out of the build context.

ARG RUST_IMAGE=rust:1.95-bookworm
# CUDA 13.0 (the toolkit build-cuda.sh builds with), runtime flavour: libcudart.so.13,
# libcublas.so.13, libcublasLt.so.13, libcurand.so.10. Not the driver (libcuda.so.1): the NVIDIA
# container runtime mounts the host's, which must be R580 / CUDA 13.0 or newer.
ARG RUNTIME_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

# --- build --------------------------------------------------------------------------------------
# scripts/build-cuda.sh needs no CUDA install: it downloads NVIDIA's CUDA 13.0 wheels from PyPI
# (python3 + pip), builds the driver stub with cc, and runs
# `cargo build --release -p prunesweep-worker --features cuda` into target/cuda. Bookworm's
# gcc 12 is a host compiler nvcc 13.0 accepts. A clean build takes ~30 min on 2 cores.
FROM ${RUST_IMAGE} AS build
ARG CUDA_COMPUTE_CAP=90
ARG CUDAFORGE_THREADS=2
# Unpinned: the distribution's current package (pinning breaks as soon as Debian updates it).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip gcc g++ binutils \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The toolkit cache and cargo's registry and target dir are BuildKit caches: a rebuild after a
# source change reuses the unpacked toolkit and the compiled kernels. NICE=0: the build is the
# only thing running here.
RUN --mount=type=cache,target=/root/.cache/prunesweep \
    --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} CUDAFORGE_THREADS=${CUDAFORGE_THREADS} NICE=0 \
        scripts/build-cuda.sh \
    && install -D -m 0755 target/cuda/release/worker /out/worker \
    && strip /out/worker

# --- runtime ------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE}
RUN groupadd --system --gid 10001 prunesweep \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/prunesweep --create-home \
        --shell /usr/sbin/nologin prunesweep
# The launcher (scripts/cuda/worker-cuda) runs `worker` next to it after checking that every CUDA
# library is found (LD_LIBRARY_PATH, which this image sets to /usr/local/nvidia/lib64 among
# others, then the loader cache), and names the missing one instead of the loader's one-liner.
COPY --from=build /out/worker /opt/prunesweep/worker
COPY scripts/cuda/worker-cuda /opt/prunesweep/worker-cuda
RUN chmod 0755 /opt/prunesweep/worker /opt/prunesweep/worker-cuda \
    && ln -s /opt/prunesweep/worker-cuda /usr/local/bin/worker-cuda
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/prunesweep
# The launcher execs the worker, so the worker is PID 1 and gets SIGTERM itself: it stops
# leasing, checkpoints a healing job and exits.
ENTRYPOINT ["/opt/prunesweep/worker-cuda"]
CMD ["doctor", "--device", "cuda:0"]
