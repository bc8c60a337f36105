# nginx for the compose stack: the gRPC balancer in front of the rnnserve replicas, with session affinity
# (deploy/nginx.conf), from Debian's package (1.22: http2, grpc_pass, `hash ... consistent`).
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
 && nginx -V 2>&1 | grep -q -- --with-http_v2_module
COPY deploy/nginx.conf /etc/nginx/nginx.conf
EXPOSE 50051
# Healthy once it accepts connections on the gRPC port (it checks its configuration first: see CMD).
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/50051"]
STOPSIGNAL SIGQUIT
CMD ["bash", "-c", "nginx -t -q && exec nginx -g 'daemon off;'"]
