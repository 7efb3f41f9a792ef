# Multi-stage build of edge-router: build with the Rust toolchain (and cmake,
# which Pingora's zlib-ng needs), run as a non-root user on a slim base.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The image is the production build: it carries the DynamoDB table backend.
RUN cargo build --release --locked -p edge-router --features dynamodb \
 && cp target/release/edge-router /usr/local/bin/edge-router

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin edge
COPY --from=build /usr/local/bin/edge-router /usr/local/bin/edge-router
COPY examples/production.toml /etc/edge-router/edge-router.toml
USER 10001
# mimalloc returns freed memory at once instead of keeping it at its high-water
# mark (10,000 idle clients closing: RSS 161 -> 25 MiB; no CPU cost measured;
# docs/benchmarks.md).
ENV MIMALLOC_PURGE_DELAY=0
# 8080: traffic and the health path; 9901: admin (binds loopback unless the config says otherwise).
EXPOSE 8080 9901
HEALTHCHECK --interval=5s --timeout=2s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/.edge/health >/dev/null || exit 1
# SIGTERM drains: the health path turns 503 and traffic is served for drain_period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/edge-router"]
CMD ["run", "-c", "/etc/edge-router/edge-router.toml"]
