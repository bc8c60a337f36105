# Redis for the compose stack's shared session store, from Debian's package (no image registry needed).
# Sessions are small (an RNN's state is fixed-size) and each carries its own TTL; the append-only file
# (fsync every second) keeps them across a Redis restart, in the `redis-data` volume.
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s CMD ["redis-cli", "ping"]
ENTRYPOINT ["/usr/bin/redis-server"]
CMD ["--bind", "0.0.0.0", "--protected-mode", "no", "--port", "6379", "--dir", "/data", \
     "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--maxmemory-policy", "noeviction"]
