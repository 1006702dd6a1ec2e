"""The console's pages: each handler reads its form or query, calls the SDK with the session's
token and renders a template. Errors are the API's: a GpufedError becomes a page (or fragment)
naming its code and reason with the matching HTTP status; nothing the browser sends reaches
the API without the bounds below."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.console import session
from gpufed.cli.nodes import OFFER_HEADER, offer_rows
from gpufed.cli.output import health
from gpufed.client import POOL_CHOICES, Client, GpufedError, gpu_filter
from gpufed.v1 import admin_pb2, discovery_pb2, lease_pb2

HERE = Path(__file__).parent
PAGE_SIZE = 50
MAX_FIELD_CHARS = 256  # any single form or query value
ORDER_BY = {"price": 1, "distance": 2, "free": 3}
POOLS = ("", "own-first", "own-only", "federation-only")
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}

Handler = Callable[[Request], Awaitable[Response]]


class BadInput(Exception):
    """A form or query value the console refuses before calling the API."""


def create_app(api: Client, *, secure_cookie: bool = True) -> Starlette:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))

    def render(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        token = request.cookies.get(session.COOKIE, "")
        kind = request.cookies.get(session.KIND_COOKIE, "")
        body = env.get_template(name).render(
            csrf=session.csrf_token(token) if token else "",
            kind=kind if kind in session.KINDS else "",
            signed_in=bool(token),
            path=request.url.path,
            **ctx,
        )
        return HTMLResponse(body, status_code=status)

    def client(request: Request) -> Client:
        return Client.sharing(api, request.cookies.get(session.COOKIE, ""))

    def page(name: str, write: bool = False) -> Callable[[Handler], Handler]:
        """A signed-in page: no session -> the sign-in page; a write without its CSRF token ->
        403 before the API is asked; the API's errors -> a page naming code and reason."""

        def wrap(fn: Handler) -> Handler:
            @functools.wraps(fn)
            async def handler(request: Request) -> Response:
                token = request.cookies.get(session.COOKIE, "")
                if not token:
                    if request.headers.get("hx-request"):
                        return Response(status_code=401, headers={"hx-redirect": "/signin"})
                    return RedirectResponse("/signin", status_code=303)
                if write:
                    refused = await _check_write(request, token)
                    if refused is not None:
                        return refused
                try:
                    return await fn(request)
                except BadInput as e:
                    return render(
                        request, "error.html", 400, code="INVALID_ARGUMENT", reason="", message=str(e)
                    )
                except GpufedError as e:
                    status = _HTTP_STATUS.get(e.code, 500)
                    if e.code == grpc.StatusCode.UNAUTHENTICATED:
                        resp: Response = RedirectResponse("/signin?expired=1", status_code=303)
                        _clear(resp)
                        return resp
                    return render(
                        request, "error.html", status, code=e.code.name, reason=e.reason, message=e.message
                    )

            return handler

        return wrap

    def _refused(request: Request, why: str) -> HTMLResponse:
        return render(request, "error.html", 403, code="PERMISSION_DENIED", reason="CSRF", message=why)

    async def _check_write(request: Request, token: str) -> Response | None:
        if not _from_here(request):
            return _refused(request, "a write from another origin")
        given = request.headers.get(session.CSRF_HEADER, "")
        if not given:
            form = await request.form()
            given = str(form.get(session.CSRF_FIELD, ""))
        if not session.csrf_ok(token, given):
            return _refused(request, "the form's CSRF token is missing or wrong: reload the page")
        return None

    def _clear(resp: Response) -> None:
        for name in (session.COOKIE, session.KIND_COOKIE):
            resp.delete_cookie(name, path="/", secure=secure_cookie, httponly=True, samesite="strict")

    async def index(request: Request) -> Response:
        if not request.cookies.get(session.COOKIE):
            return RedirectResponse("/signin", status_code=303)
        return RedirectResponse("/offers", status_code=303)

    async def signin_form(request: Request) -> Response:
        return render(request, "signin.html", expired=bool(request.query_params.get("expired")), error="")

    async def signin(request: Request) -> Response:
        if not _from_here(request):
            return render(request, "signin.html", 403, expired=False, error="a sign-in from another origin")
        form = await request.form()
        token = str(form.get("token", "")).strip()
        if not session.plausible_token(token):
            return render(request, "signin.html", 400, expired=False, error="that is not a gpufed token")
        try:
            kind = await run_in_threadpool(_kind_of, Client.sharing(api, token))
        except GpufedError as e:
            return render(
                request, "signin.html", 401, expired=False, error=f"{e.code.name} {e.reason}".strip()
            )
        resp = RedirectResponse("/offers" if kind != "provider" else "/nodes", status_code=303)
        opts: dict[str, Any] = {"path": "/", "secure": secure_cookie, "httponly": True, "samesite": "strict"}
        resp.set_cookie(session.COOKIE, token, **opts)
        resp.set_cookie(session.KIND_COOKIE, kind, **opts)
        return resp

    @page("signout", write=True)
    async def signout(request: Request) -> Response:
        resp = RedirectResponse("/signin", status_code=303)
        _clear(resp)
        return resp

    @page("offers")
    async def offers(request: Request) -> Response:
        q = _bounded(dict(request.query_params))
        req = _offers_request(q)
        resp = await run_in_threadpool(client(request).call, api.discovery.SearchOffers, req)
        rows = offer_rows(list(resp.offers))[1:]
        ctx = {
            "header": OFFER_HEADER,
            "rows": rows,
            "q": q,
            "qs": {k: v for k, v in q.items() if k != "page_token"},
            "next_page": resp.next_page_token,
            "pools": POOLS,
        }
        if request.headers.get("hx-request"):
            return render(request, "offers_table.html", **ctx)
        return render(request, "offers.html", **ctx)

    @page("leases")
    async def leases(request: Request) -> Response:
        return render(request, "leases.html", **(await _leases_ctx(request)))

    @page("leases")
    async def leases_table(request: Request) -> Response:
        return render(request, "leases_table.html", **(await _leases_ctx(request)))

    async def _leases_ctx(request: Request) -> dict[str, Any]:
        q = _bounded(dict(request.query_params))
        req = lease_pb2.ListLeasesRequest(page_size=PAGE_SIZE, page_token=q.get("page_token", ""))
        state = q.get("state", "")
        if state:
            try:
                req.state = lease_pb2.LeaseState.Value("LEASE_STATE_" + state.upper())
            except ValueError as e:
                raise BadInput(f"unknown lease state {state!r}") from e
        resp = await run_in_threadpool(client(request).call, api.leases.ListLeases, req)
        return {"leases": [_lease_row(x) for x in resp.leases], "next_page": resp.next_page_token, "q": q}

    @page("leases", write=True)
    async def create_lease(request: Request) -> Response:
        form = _bounded({k: str(v) for k, v in (await request.form()).items()})
        count = _int(form.get("count", "1"), "count", 1, 1024)
        ttl = _int(form.get("ttl", "300"), "ttl", 10, 86400)
        kwargs = _filter_kwargs(form)
        c = client(request)
        await run_in_threadpool(
            lambda: c.create_lease(count, ttl_s=ttl, interruptible=bool(form.get("interruptible")), **kwargs)
        )
        return render(request, "leases_table.html", **(await _leases_ctx(request)))

    @page("leases", write=True)
    async def release_lease(request: Request) -> Response:
        lease_id = request.path_params["lease_id"]
        if not (0 < len(lease_id) <= 64 and lease_id.isalnum()):
            raise BadInput("not a lease id")
        c = client(request)
        await run_in_threadpool(c.release_lease, f"leases/{lease_id}")
        return render(request, "leases_table.html", **(await _leases_ctx(request)))

    @page("capacity")
    async def capacity(request: Request) -> Response:
        resp = await run_in_threadpool(
            client(request).call, api.discovery.SummarizeCapacity, discovery_pb2.SummarizeCapacityRequest()
        )
        buckets = [
            {
                "model": b.gpu_model,
                "country": b.country_code,
                "health": health(b.health),
                "total": b.total_gpus,
                "free": b.free_gpus,
            }
            for b in resp.buckets
        ]
        return render(request, "capacity.html", summary=resp, buckets=buckets)

    routes = [
        Route("/", index),
        Route("/signin", signin_form, methods=["GET"]),
        Route("/signin", signin, methods=["POST"]),
        Route("/signout", signout, methods=["POST"]),
        Route("/offers", offers),
        Route("/leases", leases, methods=["GET"]),
        Route("/leases", create_lease, methods=["POST"]),
        Route("/leases/table", leases_table),
        Route("/leases/{lease_id}/release", release_lease, methods=["POST"]),
        Route("/capacity", capacity),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)])


class SecurityHeaders:
    """Every response's security headers (session.SECURITY_HEADERS); static files may be cached."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in session.SECURITY_HEADERS.items():
                    if not (static and k == "cache-control"):
                        headers.setdefault(k, v)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _from_here(request: Request) -> bool:
    return session.same_origin(
        request.headers.get("origin"), request.url.scheme, request.headers.get("host", "")
    )


def _kind_of(c: Client) -> str:
    """Which views a token gets (AdminService.GetCaller); UNAUTHENTICATED is raised."""
    kind = c.call(c.admin.GetCaller, admin_pb2.GetCallerRequest(), retry=False).kind
    return {admin_pb2.TOKEN_KIND_PROVIDER: "provider", admin_pb2.TOKEN_KIND_ADMIN: "admin"}.get(
        kind, "tenant"
    )


def _bounded(values: dict[str, str]) -> dict[str, str]:
    for k, v in values.items():
        if len(k) > 64 or len(v) > MAX_FIELD_CHARS:
            raise BadInput(f"{k[:64]!r} is longer than {MAX_FIELD_CHARS} characters")
    return values


def _int(text: str, name: str, lo: int, hi: int) -> int:
    try:
        v = int(text or lo)
    except ValueError as e:
        raise BadInput(f"{name} must be a whole number") from e
    if not lo <= v <= hi:
        raise BadInput(f"{name} must be in {lo}..{hi}")
    return v


def _float(text: str, name: str) -> float:
    try:
        return float(text) if text else 0.0
    except ValueError as e:
        raise BadInput(f"{name} must be a number") from e


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _filter_kwargs(q: dict[str, str]) -> dict[str, Any]:
    """The CLI's filter flags, from a form: model, countries (DE,FR), max_price, near
    (LAT,LON,KM), include_degraded."""
    near = None
    if q.get("near"):
        parts = _csv(q["near"])
        if len(parts) != 3:
            raise BadInput("near must be LAT,LON,RADIUS_KM")
        near = (_float(parts[0], "near"), _float(parts[1], "near"), _float(parts[2], "near"))
    return {
        "gpu_model": q.get("model", "").strip(),
        "countries": [c.upper() for c in _csv(q.get("countries", ""))],
        "max_price": _float(q.get("max_price", ""), "max_price"),
        "near": near,
        "include_degraded": bool(q.get("include_degraded")),
    }


def _offers_request(q: dict[str, str]) -> discovery_pb2.SearchOffersRequest:
    order = q.get("order_by", "price") or "price"
    if order not in ORDER_BY:
        raise BadInput(f"order_by must be one of {', '.join(ORDER_BY)}")
    pool = q.get("pool", "")
    if pool not in POOLS:
        raise BadInput(f"pool must be one of {', '.join(p for p in POOLS if p)}")
    req = discovery_pb2.SearchOffersRequest(
        filter=gpu_filter(**_filter_kwargs(q)),
        min_free_gpus=_int(q.get("count", "0"), "count", 0, 1024),
        order_by=ORDER_BY[order],  # type: ignore[arg-type]
        page_size=PAGE_SIZE,
        page_token=q.get("page_token", ""),
    )
    if pool:
        req.pool = POOL_CHOICES[pool]
    return req


def _lease_row(lease: lease_pb2.Lease) -> dict[str, Any]:
    state = lease_pb2.LeaseState.Name(lease.state).removeprefix("LEASE_STATE_")
    end = (
        lease_pb2.LeaseEndReason.Name(lease.end_reason).removeprefix("LEASE_END_REASON_")
        if lease.end_reason
        else ""
    )
    nodes = sorted({g.node for g in lease.gpus})
    return {
        "name": lease.name,
        "id": lease.name.removeprefix("leases/"),
        "state": state,
        "end": end,
        "gpus": len(lease.gpus) or lease.gpu_count,
        "model": lease.gpus[0].model if lease.gpus else "",
        "nodes": ", ".join(nodes),
        "expires": lease.expire_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        if lease.HasField("expire_time")
        else "",
        "access": [
            (d.node, d.ssh or d.endpoint or d.instructions)
            for d in lease.access_details
            if d.ssh or d.endpoint or d.instructions
        ],
        "live": state not in ("ENDED",),
    }
