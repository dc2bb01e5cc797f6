# Multi-stage: build with the Rust toolchain, run on a slim Debian as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 worker
COPY --from=build /src/target/release/profile-worker /usr/local/bin/profile-worker
COPY seeds /seeds
USER worker
ENTRYPOINT ["profile-worker"]
CMD ["run"]
