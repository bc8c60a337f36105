# Prometheus for the compose stack, from Debian's package (no image registry needed).
# Its configuration is deploy/prometheus.yml (baked in; compose also mounts it, so edits need no rebuild).
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
COPY deploy/prometheus.yml /etc/prometheus/prometheus.yml
USER prometheus
EXPOSE 9090
# Healthy once it answers a query (this promtool has no `check healthy`).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s \
  CMD ["promtool", "query", "instant", "http://localhost:9090", "vector(1)"]
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", \
     "--storage.tsdb.retention.time=15d", "--web.listen-address=:9090"]
