# One image for every tracehop binary (gateway, users, billing, notifications, stripe-sim, stack);
# docker-compose.yml picks the binary with `command:`.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpq-dev protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Without the default `fault-injection` feature: no fault routes, no panic hook in a production image.
RUN cargo build --release --workspace --bins --no-default-features \
 && mkdir /out \
 && cp target/release/gateway target/release/users target/release/billing \
       target/release/notifications target/release/stripe-sim target/release/stack /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpq5 ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 tracehop \
 && mkdir -p /secrets/private /secrets/public /var/spool/tracehop \
 && chown tracehop /secrets/private /secrets/public /var/spool/tracehop \
 && chmod 700 /secrets/private
COPY --from=build /out/ /usr/local/bin/
USER tracehop
WORKDIR /home/tracehop
