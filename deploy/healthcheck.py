#!/usr/bin/env python3
"""Health probe for a Fleetwire daemon, for container health checks (deploy/compose.yaml).

    healthcheck.py grpc HOST:PORT --ca FILE [--service NAME] [--server-name NAME]
    healthcheck.py grpc HOST:PORT --plaintext [--service NAME]
    healthcheck.py http URL

`grpc` asks the standard gRPC health service (grpc.health.v1.Health/Check) of a server
that does not ask for a client certificate, trusting the certificate in FILE: the hub's
operator API with the hub's own tls.crt (made out to 127.0.0.1, localhost and the
instance name). A spoke's API and the hub's peer API take only peers' certificates, so
they cannot be probed this way; probe their metrics endpoint with `http` instead.
Exit 0 when healthy, 1 otherwise, with one line on stderr saying why.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path

TIMEOUT_SECONDS = 3.0


def check_grpc(address: str, ca: str, plaintext: bool, service: str, server_name: str) -> str:
    """'' when the service answers SERVING, else why not."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if plaintext:
        channel = grpc.insecure_channel(address)
    else:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        creds = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())
        channel = grpc.secure_channel(address, creds, options=options)
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            return f"{address}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    return "" if status == "SERVING" else f"{address}: {service or 'server'} is {status}"


def check_http(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as resp:
            return "" if resp.status == 200 else f"{url}: HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    g = sub.add_parser("grpc", help="gRPC health service over TLS (or plaintext)")
    g.add_argument("address", help="HOST:PORT")
    how = g.add_mutually_exclusive_group(required=True)
    how.add_argument("--ca", help="certificate to trust (the hub's tls.crt)")
    how.add_argument("--plaintext", action="store_true", help="for a daemon run --insecure")
    g.add_argument("--service", default="", help="service name ('' : the whole server)")
    g.add_argument("--server-name", default="", help="name to check the certificate for, "
                   "when HOST is not in it")
    h = sub.add_parser("http", help="an HTTP endpoint answering 200 (e.g. /metrics)")
    h.add_argument("url")
    args = parser.parse_args(argv)
    try:
        if args.kind == "grpc":
            why = check_grpc(args.address, args.ca or "", args.plaintext, args.service,
                             args.server_name)
        else:
            why = check_http(args.url)
    except Exception as exc:  # any failure is "unhealthy", said in one line
        why = f"{type(exc).__name__}: {exc}"
    if why:
        print(f"unhealthy: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
