# ortserve image. CPU by default; CUDA 13 / cuDNN 9 with `--build-arg VARIANT=cuda`.
#   docker build -t ortserve:cpu .
#   docker build --build-arg VARIANT=cuda -t ortserve:cuda .
# The runtime tree (/opt/ortserve) is made by scripts/layout-runtime.sh, which tests/deploy.rs
# also runs, so the layout the binary expects is checked without Docker.
ARG VARIANT=cpu

FROM rust:1.95-bookworm AS build
# Build stage only: the Python used to fetch and convert the model comes from Debian's current
# bookworm packages; pinning their exact versions would break with every point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked
ARG VARIANT
RUN scripts/layout-runtime.sh /opt/ortserve --binary target/release/ortserve --variant "${VARIANT}"

FROM debian:bookworm-slim AS runtime-cpu

FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS runtime-cuda
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CUDA_DEVICE_ORDER=PCI_BUS_ID

# A stage chosen by VARIANT (runtime-cpu or runtime-cuda), not an image to pin.
# hadolint ignore=DL3006
FROM runtime-${VARIANT}
COPY --from=build /opt/ortserve /opt/ortserve
# No shell or curl is needed at run time: the health check is the binary's own probe.
USER 65532:65532
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["/opt/ortserve/ortserve", "probe", "--url", "http://127.0.0.1:8080/v2/health/ready"]
ENTRYPOINT ["/opt/ortserve/ortserve"]
CMD ["serve", "--config", "/opt/ortserve/config/config.yaml"]
