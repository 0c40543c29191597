"""The Fleet gateway: the sites' only way into the SuperLink, which lets the Fleet API through and nothing else.

    fedvlp-server fleet-gateway --listen 0.0.0.0:9093 --superlink 127.0.0.1:9092 --certs CERT_DIR

Flower 1.41 serves the Fleet API (what SuperNodes use), the Control API (``flwr run``, ``flwr supernode
register``, ``flwr stop``, ...) and the Runtime API (the ServerApp's) on one HTTP port; the separate
``--control-api-address`` is deprecated and no longer splits them, and account authentication of the
Control API (OIDC) exists only in Flower Enterprise. So the deploy kit binds the SuperLink to loopback
(``127.0.0.1:9092``, where the operator's ``flwr`` commands reach it) and puts this gateway on the port
the sites reach (``9093``): a TLS reverse proxy (the SuperLink's own certificate) that forwards each
``POST /v1/fleet/...`` request to the SuperLink unchanged, node-authentication headers included, and
answers every other path with 404 and a line in its log. Whoever can reach only the gateway can do what
a SuperNode does (and, with ``--enable-supernode-auth``, only with a registered key), but cannot submit,
stop or list runs, register keys or read logs.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                        "transfer-encoding", "upgrade", "host", "content-length", "content-encoding"})
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def create_gateway(superlink: str, ca_file: str | Path | None,
                   transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """The gateway's ASGI app, forwarding to ``https://SUPERLINK`` verified with ``ca_file``
    (``http://`` when ``ca_file`` is None: a SuperLink run with ``--insecure``; ``transport``: for tests)."""
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file)) if ca_file else False
    base = f"{'https' if ca_file else 'http'}://{superlink}"
    client = httpx.AsyncClient(base_url=base, verify=verify, timeout=httpx.Timeout(300.0, connect=10.0),
                               transport=transport)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or not path.startswith(FLEET_PREFIX):
            peer = request.client.host if request.client else "?"
            log.warning("refused %s %s from %s: this port serves the Fleet API only", request.method, path, peer)
            return PlainTextResponse("Not found: this port serves the SuperLink's Fleet API only.\n", status_code=404)
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        try:
            upstream = await client.post(path, content=await request.body(), headers=headers)
        except httpx.HTTPError as err:
            log.warning("the SuperLink at %s did not answer %s: %s", base, path, type(err).__name__)
            return PlainTextResponse("The SuperLink does not answer.\n", status_code=502)
        kept = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        return Response(content=upstream.content, status_code=upstream.status_code, headers=kept)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    return Starlette(routes=[Route("/{path:path}", forward, methods=METHODS)], lifespan=lifespan)


def serve(listen: str, superlink: str, certfile: str | Path | None, keyfile: str | Path | None,
          ca_file: str | Path | None) -> None:
    """Run the gateway on ``listen`` (HOST:PORT) with TLS (``certfile``/``keyfile``) until stopped."""
    import uvicorn

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT, e.g. 0.0.0.0:9093")
    log.info("Fleet gateway on %s -> SuperLink %s (Fleet API only)", listen, superlink)
    uvicorn.run(create_gateway(superlink, ca_file), host=host.strip("[]"), port=int(port),
                ssl_certfile=str(certfile) if certfile else None, ssl_keyfile=str(keyfile) if keyfile else None,
                access_log=False, log_level="info")
