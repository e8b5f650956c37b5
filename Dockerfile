# syntax=docker/dockerfile:1
# provider-gateway: the gateway and its CLI, built in one stage and copied
# into a slim Debian image that runs them as a non-root user.
#
#   docker build -t provider-gateway:latest .
#   docker run --rm -p 50051:50051 -p 9090:9090 provider-gateway:latest
#
# The UID (10001) is the one deploy/kubernetes/deployment.yaml runs as.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# build.rs compiles the proto with protox: no protoc is needed.
RUN cargo build --release --locked \
        -p provider-gateway-server --bin provider-gateway \
        -p provider-gateway-client --bin provider-gateway-cli \
 && cp target/release/provider-gateway target/release/provider-gateway-cli /usr/local/bin/

FROM debian:bookworm-slim
# ca-certificates: the providers are reached over HTTPS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /usr/local/bin/provider-gateway /usr/local/bin/provider-gateway-cli /usr/local/bin/
USER 10001:10001
# 50051: gRPC (API, grpc.health.v1, reflection); 9090: admin HTTP (/metrics).
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/provider-gateway"]
