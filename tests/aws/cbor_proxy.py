#!/usr/bin/env python3
"""A loopback HTTP proxy that lets current AWS SDKs talk CloudWatch to moto (tests only).

Current SDKs (aws-sdk-cloudwatch >= 1.100 for Rust) call CloudWatch with the smithy rpc-v2 CBOR
protocol: ``POST /service/GraniteServiceVersion20100801/operation/<Op>`` with
``smithy-protocol: rpc-v2-cbor`` and a CBOR body. moto serves CloudWatch over the older protocols
(awsJson 1.0 and query) but not CBOR (getmoto/moto#9195), so such calls 404 there. This proxy
translates each CBOR call into a call moto understands and moto's answer back into CBOR, using
botocore's own protocol code and CloudWatch model for every step:

    request   CBOR  --RpcV2CBORParser (input shape)--> params --JSONSerializer/QuerySerializer--> moto
    response  moto  --JSONParser/QueryParser (output shape)--> result --RpcV2CBORSerializer--> CBOR

JSON is the default upstream protocol (``--upstream-protocol query`` selects query): moto parses
large query requests very slowly (1000 datums: ~9 s, against ~0.2 s as JSON). Errors keep their
code: moto's error code becomes the CBOR ``__type`` and the ``x-amzn-query-error`` header, as
CloudWatch (awsQueryCompatible) sends them. Gzip-compressed requests (the SDKs compress large
PutMetricData bodies) are inflated first. Anything that is not a CBOR call (query or JSON requests,
moto's ``/moto-api``) is forwarded unchanged.

Usage: ``cbor_proxy.py --upstream http://127.0.0.1:PORT [--port 0] [--url-file FILE]``; the
proxy binds 127.0.0.1 and writes its URL to FILE once it accepts connections.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import http.client
import os
import re
import sys
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import botocore.session
from botocore.model import ServiceModel
from botocore.parsers import JSONParser, QueryParser, RpcV2CBORParser
from botocore.serialize import JSONSerializer, QuerySerializer, RpcV2CBORSerializer
from botocore.utils import percent_encode_sequence

SERVICE = "cloudwatch"
CBOR_PATH = re.compile(r"^/service/(?P<service>[A-Za-z0-9_.]+)/operation/(?P<operation>[A-Za-z0-9]+)$")
# Headers that describe the hop or the body, recomputed for the forwarded request.
HOP_HEADERS = {"host", "content-length", "content-encoding", "content-type", "transfer-encoding", "connection",
               "accept", "accept-encoding", "expect", "keep-alive", "smithy-protocol", "x-amz-target"}


# Protocols moto serves CloudWatch over, as botocore's serializer and parser for each. JSON is the
# default: moto parses big query requests slowly (1000 datums: ~9 s as query, ~0.2 s as JSON).
UPSTREAM_PROTOCOLS = {
    "json": (JSONSerializer, JSONParser),
    "query": (QuerySerializer, QueryParser),
}


class Translator:
    """CloudWatch rpc-v2 CBOR <-> an upstream protocol, with botocore's model, parsers and serializers."""

    def __init__(self, upstream_protocol: str = "json") -> None:
        self.serializer_class, self.parser_class = UPSTREAM_PROTOCOLS[upstream_protocol]
        data = botocore.session.get_session().get_service_data(SERVICE)
        self.cbor_model = ServiceModel(data, SERVICE)
        upstream_data = copy.deepcopy(data)
        upstream_data["metadata"]["protocol"] = upstream_protocol
        upstream_data["metadata"]["protocols"] = [upstream_protocol]
        self.upstream_model = ServiceModel(upstream_data, SERVICE)
        self.upstream_protocol = upstream_protocol
        self.target_prefix = data["metadata"]["targetPrefix"]
        self.shape_namespace = "com.amazonaws." + SERVICE

    def is_operation(self, service: str, operation: str) -> bool:
        return service == self.target_prefix and operation in self.cbor_model.operation_names

    def upstream_request(self, operation: str, cbor_body: bytes) -> tuple[dict[str, str], bytes]:
        """The upstream request (headers, body) for a CBOR request body."""
        op = self.cbor_model.operation_model(operation)
        params = {}
        if op.input_shape is not None and cbor_body:
            params = RpcV2CBORParser().parse({"body": cbor_body, "headers": {}, "status_code": 200}, op.input_shape)
            params.pop("ResponseMetadata", None)
        request = self.serializer_class().serialize_to_request(params, self.upstream_model.operation_model(operation))
        body = request["body"]
        if isinstance(body, dict):  # query: form parameters
            body = percent_encode_sequence(body).encode()
        return dict(request["headers"]), body

    def cbor_response(self, operation: str, status: int, headers: dict[str, str],
                      body: bytes) -> tuple[int, dict[str, str], bytes]:
        """The CBOR response (status, headers, body) for the upstream response."""
        op = self.upstream_model.operation_model(operation)
        lowered = {k.lower(): v for k, v in headers.items()}
        parsed = self.parser_class().parse({"body": body, "headers": lowered, "status_code": status}, op.output_shape)
        metadata = parsed.pop("ResponseMetadata", {})
        out = {
            "smithy-protocol": "rpc-v2-cbor",
            "Content-Type": "application/cbor",
            "x-amzn-requestid": metadata.get("RequestId") or lowered.get("x-amzn-requestid") or str(uuid.uuid4()),
        }
        if status >= 300:
            error = parsed.get("Error", {})
            code = error.get("Code") or str(status)
            kind = error.get("Type") or ("Sender" if status < 500 else "Receiver")
            out["x-amzn-query-error"] = f"{code};{kind}"
            shape_name = self._error_shape_name(op, code)
            error_body = {"__type": f"{self.shape_namespace}#{shape_name}", "message": error.get("Message", "")}
            return status, out, self._encode(error_body, None)
        return status, out, self._encode(parsed, op.output_shape)

    def _error_shape_name(self, op, code: str) -> str:
        for shape in op.error_shapes:
            if shape.metadata.get("error", {}).get("code", shape.name) == code or shape.name == code:
                return shape.name
        return code

    @staticmethod
    def _encode(value: dict, shape) -> bytes:
        serializer = RpcV2CBORSerializer()
        out = bytearray()
        if shape is None:
            # An error body or an operation without output: a plain map of strings.
            additional_info, num_bytes = serializer._get_additional_info_and_num_bytes(len(value))
            out.extend(serializer._get_initial_byte(serializer.MAP_MAJOR_TYPE, additional_info))
            out.extend(len(value).to_bytes(num_bytes, "big") if num_bytes else b"")
            for key, item in value.items():
                serializer._serialize_type_string(out, key, None, None)
                serializer._serialize_type_string(out, str(item), None, None)
        else:
            serializer._serialize_data_item(out, value, shape)
        return bytes(out)


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "ProxyServer"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's name)
        if self.server.verbose:
            super().log_message(format, *args)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            body = b"".join(chunks)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        return body

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, list, bytes]:
        upstream = self.server.upstream
        connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def _send(self, status: int, headers, body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        body = self._read_body()
        match = CBOR_PATH.match(urllib.parse.urlsplit(self.path).path)
        translator = self.server.translator
        is_cbor = self.headers.get("smithy-protocol", "").lower() == "rpc-v2-cbor"
        if self.command == "POST" and is_cbor and match and translator.is_operation(match["service"],
                                                                                    match["operation"]):
            operation = match["operation"]
            try:
                upstream_headers, upstream_body = translator.upstream_request(operation, body)
            except Exception as error:  # a request botocore cannot parse: say so like AWS would
                self.server.count("rejected")
                encoded = Translator._encode({"__type": "SerializationException", "message": str(error)}, None)
                self._send(400, [("smithy-protocol", "rpc-v2-cbor"), ("Content-Type", "application/cbor")], encoded)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            if "authorization" not in {k.lower() for k in headers}:
                # moto picks the service from the credential scope of the signature.
                headers["Authorization"] = ("AWS4-HMAC-SHA256 Credential=test/20200101/us-east-1/monitoring/aws4_request, "
                                            "SignedHeaders=host, Signature=0")
            headers.update(upstream_headers)
            status, response_headers, response_body = self._forward("POST", "/", headers, upstream_body)
            status, out_headers, out_body = translator.cbor_response(operation, status, dict(response_headers),
                                                                     response_body)
            self.server.count(operation)
            self._send(status, list(out_headers.items()), out_body)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection",
                                                                                "transfer-encoding", "content-encoding")}
        status, out_headers, out_body = self._forward(self.command, self.path, headers, body)
        self.server.count("passthrough")
        self._send(status, out_headers, out_body)

    def _safe_handle(self) -> None:
        try:
            self._handle()
        except (ConnectionError, TimeoutError, OSError) as error:
            try:
                self._send(502, [("Content-Type", "text/plain")], f"upstream unreachable: {error}".encode())
            except OSError:
                pass

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _safe_handle


class ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0, verbose: bool = False,
                 upstream_protocol: str = "json") -> None:
        super().__init__((host, port), ProxyHandler)
        self.upstream = urllib.parse.urlsplit(upstream)
        self.translator = Translator(upstream_protocol)
        self.verbose = verbose
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + 1


def write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="moto's URL, e.g. http://127.0.0.1:5000")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0: any free port)")
    parser.add_argument("--url-file", help="write the proxy's URL here once it listens")
    parser.add_argument("--upstream-protocol", choices=sorted(UPSTREAM_PROTOCOLS), default="json",
                        help="protocol to speak to moto (default json; query works too, slowly for big requests)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if not (args.host.startswith("127.") or args.host in ("localhost", "::1")):
        parser.error("the proxy only binds loopback addresses")
    server = ProxyServer(args.upstream, args.host, args.port, args.verbose, args.upstream_protocol)
    if args.url_file:
        write_atomically(args.url_file, server.url + "\n")
    print(f"cbor proxy {server.url} -> {args.upstream}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
