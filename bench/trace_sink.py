"""An OTLP/gRPC trace sink for the benchmark: accepts every export and decodes nothing, so the gateway pays the
full price of exporting its spans (the default protocol) while the sink costs the load CPU as little as it can.

    python bench/trace_sink.py PORT
"""

from __future__ import annotations

import sys
from concurrent import futures

import grpc

EMPTY_RESPONSE = b""  # ExportTraceServiceResponse with no partial_success: zero bytes on the wire


def export(request: bytes, context: grpc.ServicerContext) -> bytes:
    return EMPTY_RESPONSE


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 14317
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)})  # no (de)serializers: raw bytes
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"trace sink on {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
