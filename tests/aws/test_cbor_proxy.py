"""The CBOR proxy against an in-process moto: calls are made exactly as a current SDK makes them
(botocore's RpcV2CBORSerializer, the protocol aws-sdk-cloudwatch speaks) and answers are read with
botocore's RpcV2CBORParser."""

from __future__ import annotations

import datetime
import gzip
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from botocore.parsers import RpcV2CBORParser
from botocore.serialize import RpcV2CBORSerializer
from moto.server import ThreadedMotoServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cbor_proxy import ProxyServer, Translator  # noqa: E402

AUTHORIZATION = ("AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/monitoring/aws4_request, "
                 "SignedHeaders=host, Signature=0")
MODEL = Translator().cbor_model


@pytest.fixture(scope="module")
def moto_url():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module", params=["json", "query"])
def proxy(moto_url, request):
    """The proxy, once per protocol it can speak to moto."""
    server = ProxyServer(moto_url, upstream_protocol=request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def cbor_call(proxy_url: str, operation: str, params: dict, compress: bool = False):
    """One rpc-v2 CBOR call; returns (status, lower-cased headers, parsed body)."""
    op = MODEL.operation_model(operation)
    request = RpcV2CBORSerializer().serialize_to_request(params, op)
    headers = dict(request["headers"])
    headers["Authorization"] = AUTHORIZATION
    body = request["body"]
    if compress:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    url = urllib.parse.urlsplit(proxy_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        connection.request("POST", request["url_path"], body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        response_headers = {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()
    assert response_headers.get("smithy-protocol") == "rpc-v2-cbor", (response.status, response_headers, data)
    parsed = RpcV2CBORParser().parse({"body": data, "headers": response_headers, "status_code": response.status},
                                     op.output_shape)
    return response.status, response_headers, parsed


def metric_sum(proxy_url: str, namespace: str, name: str, dimensions: list[dict], stat: str, start, end) -> list:
    status, _, parsed = cbor_call(proxy_url, "GetMetricData", {
        "MetricDataQueries": [{
            "Id": "q",
            "MetricStat": {
                "Metric": {"Namespace": namespace, "MetricName": name, "Dimensions": dimensions},
                "Period": 60,
                "Stat": stat,
            },
        }],
        "StartTime": start,
        "EndTime": end,
    })
    assert status == 200, parsed
    return parsed["MetricDataResults"][0]["Values"]


def test_put_metric_data_round_trips_through_get_metric_data(proxy):
    run = uuid.uuid4().hex
    now = datetime.datetime.now(datetime.timezone.utc)
    dims = [{"Name": "Exchange", "Value": "kraken"}, {"Name": "Run", "Value": run}]
    status, headers, parsed = cbor_call(proxy.url, "PutMetricData", {
        "Namespace": "Tradeeon/ProxyTest",
        "MetricData": [
            {"MetricName": "HealthCheckLatency", "Dimensions": dims, "Values": [10.0, 250.0], "Counts": [3.0, 1.0],
             "Unit": "Milliseconds", "Timestamp": now},
            {"MetricName": "QueueDepth", "Dimensions": [{"Name": "Run", "Value": run}], "Unit": "Count",
             "StatisticValues": {"SampleCount": 2.0, "Sum": 9.0, "Minimum": 2.0, "Maximum": 7.0}, "Timestamp": now},
            {"MetricName": "SweepCompleted", "Dimensions": [{"Name": "Run", "Value": run}], "Value": 1.0,
             "Unit": "Count", "Timestamp": now},
        ],
    })
    assert status == 200, parsed
    assert headers["x-amzn-requestid"]

    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(minutes=5)
    assert metric_sum(proxy.url, "Tradeeon/ProxyTest", "HealthCheckLatency", dims, "Sum", start, end) == [280.0]
    assert metric_sum(proxy.url, "Tradeeon/ProxyTest", "HealthCheckLatency", dims, "SampleCount", start, end) == [4.0]
    assert metric_sum(proxy.url, "Tradeeon/ProxyTest", "HealthCheckLatency", dims, "Maximum", start, end) == [250.0]
    run_dim = [{"Name": "Run", "Value": run}]
    assert metric_sum(proxy.url, "Tradeeon/ProxyTest", "QueueDepth", run_dim, "Maximum", start, end) == [7.0]
    assert metric_sum(proxy.url, "Tradeeon/ProxyTest", "SweepCompleted", run_dim, "Sum", start, end) == [1.0]
    assert proxy.counts.get("PutMetricData", 0) >= 1
    assert proxy.counts.get("GetMetricData", 0) >= 5


def test_gzip_compressed_requests_are_inflated(proxy):
    run = uuid.uuid4().hex
    now = datetime.datetime.now(datetime.timezone.utc)
    dims = [{"Name": "Run", "Value": run}]
    data = [{"MetricName": "JobsProcessed", "Dimensions": dims, "Value": 1.0, "Unit": "Count", "Timestamp": now}
            for _ in range(300)]
    status, _, parsed = cbor_call(proxy.url, "PutMetricData", {"Namespace": "Tradeeon/ProxyTest", "MetricData": data},
                                  compress=True)
    assert status == 200, parsed
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(minutes=5)
    assert metric_sum(proxy.url, "Tradeeon/ProxyTest", "JobsProcessed", dims, "Sum", start, end) == [300.0]


def test_dashboards_round_trip_and_errors_keep_their_code(proxy):
    name = f"proxy-test-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"widgets": [{"type": "text", "x": 0, "y": 0, "width": 6, "height": 2,
                                    "properties": {"markdown": "hello"}}]})
    status, _, parsed = cbor_call(proxy.url, "PutDashboard", {"DashboardName": name, "DashboardBody": body})
    assert status == 200, parsed
    assert parsed.get("DashboardValidationMessages", []) == []

    status, _, parsed = cbor_call(proxy.url, "GetDashboard", {"DashboardName": name})
    assert status == 200, parsed
    assert parsed["DashboardName"] == name
    assert json.loads(parsed["DashboardBody"]) == json.loads(body)

    status, headers, parsed = cbor_call(proxy.url, "GetDashboard", {"DashboardName": "no-such-dashboard"})
    assert status == 404
    assert headers["x-amzn-query-error"] == "ResourceNotFound;Sender"
    assert parsed["Error"]["Code"] == "ResourceNotFound"
    assert "does not exist" in parsed["Error"]["Message"]

    status, headers, parsed = cbor_call(proxy.url, "PutDashboard", {"DashboardName": name, "DashboardBody": "{not json"})
    assert status == 400
    assert parsed["Error"]["Code"] == "InvalidParameterInput"


def test_other_requests_pass_through_unchanged(proxy):
    form = urllib.parse.urlencode({"Action": "ListDashboards", "Version": "2010-08-01"}).encode()
    request = urllib.request.Request(proxy.url + "/", data=form, headers={
        "Authorization": AUTHORIZATION, "Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        assert b"<ListDashboardsResponse" in response.read()
    with urllib.request.urlopen(proxy.url + "/moto-api/data.json", timeout=30) as response:
        assert response.status == 200
    assert proxy.counts.get("passthrough", 0) >= 2


def test_the_command_line_writes_its_url_once_it_listens(moto_url, tmp_path):
    url_file = tmp_path / "proxy.url"
    script = Path(__file__).resolve().parent / "cbor_proxy.py"
    process = subprocess.Popen([sys.executable, str(script), "--upstream", moto_url, "--url-file", str(url_file)],
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not url_file.exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the proxy did not write its URL"
            time.sleep(0.05)
        url = url_file.read_text().strip()
        assert url.startswith("http://127.0.0.1:")
        status, _, parsed = cbor_call(url, "ListDashboards", {})
        assert status == 200, parsed
    finally:
        process.terminate()
        process.wait(timeout=10)
    rejected = subprocess.run([sys.executable, str(script), "--upstream", moto_url, "--host", "0.0.0.0"],
                              capture_output=True, timeout=60, env={**os.environ})
    assert rejected.returncode != 0
    assert b"loopback" in rejected.stderr
