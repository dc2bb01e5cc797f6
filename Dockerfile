# Multi-stage: build with the Rust toolchain, run on a slim Debian as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
# amq-protocol-types, patched (vendor/README.md): Cargo.toml's [patch.crates-io].
COPY vendor vendor
# The workspace's other members (test harness, load generator): cargo reads
# their manifests; only the worker is built.
COPY testkit testkit
COPY loadgen loadgen
RUN cargo build --release --locked -p profile-worker

FROM debian:bookworm-slim
# curl: compose's health check asks /readyz with it.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 worker \
    && mkdir -m 700 /secrets && chown 10001 /secrets
COPY --from=build /src/target/release/profile-worker /usr/local/bin/profile-worker
# No seed and no access token in the image: tokens are made per deployment with
# `profile-worker access-tokens create` (CONTRACT §8). /secrets: compose's
# first token is written there (a named volume takes this directory's owner
# and mode on first use), readable by the worker's user only.
# Numeric, so a pod's runAsNonRoot can see it is not root.
USER 10001:10001
# /metrics, /healthz and /readyz on every interface of the container (the
# binary's own default is loopback, which a published port cannot reach).
ENV HTTP_ADDR=0.0.0.0:8742
EXPOSE 8742
ENTRYPOINT ["profile-worker"]
CMD ["run"]
