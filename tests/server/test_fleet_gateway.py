"""The Fleet gateway passes the SuperLink's Fleet API, unchanged, and nothing else."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from server.fleet_gateway import create_gateway


def call(method: str, path: str, upstream, **kwargs) -> httpx.Response:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return upstream(request)

    gateway = create_gateway("superlink:9092", None, transport=httpx.MockTransport(handler))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="https://gw") as client:
            return await client.request(method, path, **kwargs)

    response = asyncio.run(go())
    response.seen = seen
    return response


def test_a_fleet_request_is_forwarded_unchanged_with_the_superlinks_answer():
    answer = call("POST", "/v1/fleet/pull-messages", lambda r: httpx.Response(200, content=b"\x08\x01",
                  headers={"content-type": "application/protobuf", "x-flwr-version": "1.41.0"}),
                  content=b"\x0a\x03abc", headers={"x-flwr-signature": "c2ln", "content-type": "application/protobuf"})
    assert answer.status_code == 200 and answer.content == b"\x08\x01" and answer.headers["x-flwr-version"] == "1.41.0"
    (request,) = answer.seen
    assert str(request.url) == "http://superlink:9092/v1/fleet/pull-messages"
    assert request.content == b"\x0a\x03abc" and request.headers["x-flwr-signature"] == "c2ln"  # node auth passes


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/control/start-run"), ("POST", "/v1/control/register-node"), ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/runtime/acquire-task"), ("GET", "/docs"), ("GET", "/v1/fleet/pull-messages"), ("POST", "/v1/fleetx"),
])
def test_everything_else_is_not_found_and_never_reaches_the_superlink(method, path):
    answer = call(method, path, lambda r: httpx.Response(200))
    assert answer.status_code == 404 and answer.seen == []
    assert "Fleet API only" in answer.text


def test_a_superlink_that_does_not_answer_is_a_bad_gateway_the_sites_retry():
    def down(request):
        raise httpx.ConnectError("connection refused")

    assert call("POST", "/v1/fleet/send-node-heartbeat", down, content=b"").status_code == 502
