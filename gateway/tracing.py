"""OpenTelemetry spans per request, exported over OTLP/HTTP only when an endpoint is configured.

With no endpoint the gateway holds no tracer at all, so the hot path pays nothing.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("pythia.tracing")


class Tracing:
    """`tracer` is an OpenTelemetry tracer exporting in batches to `endpoint`, or None when off."""

    def __init__(self, endpoint: str, service_name: str) -> None:
        self.tracer: Any = None
        self._provider: Any = None
        if not endpoint:
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        base = endpoint.rstrip("/")
        url = base if base.endswith("/v1/traces") else base + "/v1/traces"
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        self.tracer = self._provider.get_tracer("pythia.gateway")
        log.info("tracing to %s", url)

    def shutdown(self) -> None:
        """Flush pending spans and stop the exporter."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None
