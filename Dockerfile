# ortserve image. CPU by default; CUDA 13 / cuDNN 9 with two build arguments:
#   docker build -t ortserve:cpu .
#   docker build --build-arg VARIANT=cuda \
#     --build-arg BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 -t ortserve:cuda .
# The runtime tree (/opt/ortserve) is made by scripts/layout-runtime.sh, which tests/deploy.rs
# also runs, so the layout the binary expects is checked without Docker.
# The runtime base is an argument, not a stage picked by `FROM runtime-${VARIANT}`: buildah
# (podman build) decides which stages to build before expanding arguments, skipped both, and
# failed with "runtime-cpu: image not known" (scripts/container-test.sh).
ARG VARIANT=cpu
ARG BASE=debian:bookworm-slim

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

# The base is a build argument (debian:bookworm-slim, or NVIDIA's CUDA runtime), not an image
# to pin here.
# hadolint ignore=DL3006
FROM ${BASE}
ARG VARIANT
# The CUDA tree needs the CUDA runtime's libraries: refuse a CUDA build on another base.
RUN [ "${VARIANT}" != cuda ] || [ -d /usr/local/cuda ] \
 || { echo "VARIANT=cuda needs --build-arg BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04" >&2; exit 1; }
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CUDA_DEVICE_ORDER=PCI_BUS_ID
COPY --from=build /opt/ortserve /opt/ortserve
# No shell or curl is needed at run time: the health check is the binary's own probe.
USER 65532:65532
# 8080: the REST API; 8081: gRPC (KServe V2 and grpc.health.v1); 8082: the admin port (health,
# readiness, metrics), which clients that fill the API's connections cannot starve.
EXPOSE 8080 8081 8082
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["/opt/ortserve/ortserve", "probe", "--url", "http://127.0.0.1:8082/v2/health/ready"]
ENTRYPOINT ["/opt/ortserve/ortserve"]
CMD ["serve", "--config", "/opt/ortserve/config/config.yaml"]
