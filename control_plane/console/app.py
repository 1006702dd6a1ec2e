"""The console's pages: each handler reads its form or query, calls the SDK with the session's
token and renders a template. Errors are the API's: a GpufedError becomes a page (or fragment)
naming its code and reason with the matching HTTP status; nothing the browser sends reaches
the API without the bounds below."""

from __future__ import annotations

import functools
import json
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
from gpufed.logs import get_logger
from gpufed.v1 import admin_pb2, common_pb2, discovery_pb2, lease_pb2, reservation_pb2

log = get_logger(__name__)
HERE = Path(__file__).parent
# Country outlines (scripts/build_world_map.py: Natural Earth 1:110m through world-atlas).
WORLD: dict[str, Any] = json.loads((HERE / "world.json").read_text())
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

    def render(request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        token = request.cookies.get(session.COOKIE, "")
        kind = request.cookies.get(session.KIND_COOKIE, "")
        body = env.get_template(template).render(
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
                except Exception:  # a bug of ours: the page says so and the replica goes on
                    log.exception("console page failed", path=request.url.path)
                    return render(
                        request,
                        "error.html",
                        500,
                        code="INTERNAL",
                        reason="",
                        message="see the replica's log",
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
        c = client(request)
        resp = await run_in_threadpool(c.call, api.leases.ListLeases, req)
        rreq = reservation_pb2.ListReservationsRequest(
            page_size=PAGE_SIZE, page_token=q.get("rpage_token", "")
        )
        rresp = await run_in_threadpool(c.call, api.reservations.ListReservations, rreq)
        return {
            "leases": [_lease_row(x) for x in resp.leases],
            "next_page": resp.next_page_token,
            "reservations": [_reservation_row(r) for r in rresp.reservations],
            "next_rpage": rresp.next_page_token,
            "q": q,
        }

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

    @page("leases", write=True)
    async def cancel_reservation(request: Request) -> Response:
        rid = request.path_params["reservation_id"]
        if not (0 < len(rid) <= 64 and rid.isalnum()):
            raise BadInput("not a reservation id")
        c = client(request)
        await run_in_threadpool(c.cancel_reservation, f"reservations/{rid}")
        return render(request, "leases_table.html", **(await _leases_ctx(request)))

    @page("account")
    async def account(request: Request) -> Response:
        c = client(request)
        me = await run_in_threadpool(c.caller)
        q = _bounded(dict(request.query_params))
        kind = {admin_pb2.TOKEN_KIND_PROVIDER: "providers"}.get(me.kind, "tenants")
        # An admin looks up any tenant's (or provider's) quota and policy by name.
        subject = q.get("name", "").strip() if me.kind == admin_pb2.TOKEN_KIND_ADMIN else me.principal
        kind = q.get("kind", "tenants") if me.kind == admin_pb2.TOKEN_KIND_ADMIN else kind
        if kind not in ("tenants", "providers"):
            raise BadInput("kind must be tenants or providers")
        ctx: dict[str, Any] = {
            "me": me,
            "subject": subject,
            "subject_kind": kind,
            "quota": None,
            "policy": None,
        }
        if subject:
            got = await run_in_threadpool(c.get_quota, f"quotas/{kind}/{subject}")
            ctx["quota"] = _quota_rows(got)
            if kind == "tenants":
                policy = await run_in_threadpool(c.get_burst_policy, subject)
                ctx["policy"] = {
                    "max_price": f"{policy.max_price_per_gpu_hour:g}"
                    if policy.max_price_per_gpu_hour
                    else "no limit",
                    "countries": ", ".join(policy.countries) or "any",
                }
        return render(request, "account.html", **ctx)

    @page("account", write=True)
    async def set_quota(request: Request) -> Response:
        form = _bounded({k: str(v) for k, v in (await request.form()).items()})
        kind, subject = form.get("kind", "tenants"), form.get("name", "").strip()
        if kind not in ("tenants", "providers") or not subject:
            raise BadInput("a quota needs kind (tenants or providers) and a name")
        limits: dict[str, float] = {}
        part = admin_pb2.TenantQuota if kind == "tenants" else admin_pb2.ProviderQuota
        for field in QUOTA_FIELDS[kind]:
            if form.get(field, "").strip():
                value = _float(form[field], field)
                if (
                    part.DESCRIPTOR.fields_by_name[field].type
                    != part.DESCRIPTOR.fields_by_name[field].TYPE_DOUBLE
                ):
                    if not (value.is_integer() and 0 <= value < 2**32):
                        raise BadInput(f"{field} must be a whole number in 0..{2**32 - 1}")
                    value = int(value)
                limits[field] = value
        c = client(request)
        await run_in_threadpool(lambda: c.set_quota(f"quotas/{kind}/{subject}", **limits))
        return RedirectResponse(f"/account?kind={kind}&name={subject}", status_code=303)

    @page("account", write=True)
    async def set_burst(request: Request) -> Response:
        form = _bounded({k: str(v) for k, v in (await request.form()).items()})
        subject = form.get("name", "").strip()
        c = client(request)
        countries = [x.upper() for x in _csv(form.get("countries", ""))]
        max_price = _float(form.get("max_price", ""), "max_price")
        await run_in_threadpool(lambda: c.set_burst_policy(subject, max_price, countries))
        return RedirectResponse(f"/account?kind=tenants&name={subject}", status_code=303)

    @page("usage")
    async def usage(request: Request) -> Response:
        q = _bounded(dict(request.query_params))
        req = admin_pb2.ListUsageRecordsRequest(page_size=PAGE_SIZE, page_token=q.get("page_token", ""))
        resp = await run_in_threadpool(client(request).call, api.admin.ListUsageRecords, req)
        records = [
            {
                "lease": u.lease,
                "provider": u.provider,
                "tenant": u.tenant,
                "gpus": len(u.gpus),
                "window": f"{_when(u.start_time, seconds=True)} .. {_when(u.end_time, seconds=True)}",
                "gpu_hours": f"{u.gpu_seconds / 3600:.3f}",
                "cost": f"{u.quoted_cost:.4f} {u.currency_code}",
                "end": lease_pb2.LeaseEndReason.Name(u.end_reason).removeprefix("LEASE_END_REASON_"),
            }
            for u in resp.usage_records
        ]
        return render(request, "usage.html", records=records, next_page=resp.next_page_token)

    @page("audit")
    async def audit(request: Request) -> Response:
        return render(request, "audit.html", **(await _audit_ctx(request)))

    @page("audit")
    async def audit_table(request: Request) -> Response:
        return render(request, "audit_table.html", **(await _audit_ctx(request)))

    async def _audit_ctx(request: Request) -> dict[str, Any]:
        q = _bounded(dict(request.query_params))
        c = client(request)
        resp = await run_in_threadpool(c.audit_events, PAGE_SIZE, q.get("page_token", ""))
        events = [
            {
                "time": _when(e.time, seconds=True),
                "event": e.event,
                "principal": e.principal,
                "method": e.method,
                "target": e.target,
                "code": f"{e.code} {e.reason}".strip(),
                "details": " ".join(e.details),
            }
            for e in resp.events
        ]
        return {"events": events, "replica": resp.replica, "next_page": resp.next_page_token, "q": q}

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
        return render(
            request, "capacity.html", summary=resp, buckets=buckets, world=WORLD, map=capacity_map(resp)
        )

    @page("nodes")
    async def nodes(request: Request) -> Response:
        q = _bounded(dict(request.query_params))
        req = discovery_pb2.ListNodesRequest(page_size=PAGE_SIZE, page_token=q.get("page_token", ""))
        resp = await run_in_threadpool(client(request).call, api.discovery.ListNodes, req)
        return render(
            request, "nodes.html", nodes=[_node_row(n) for n in resp.nodes], next_page=resp.next_page_token
        )

    @page("nodes")
    async def node(request: Request) -> Response:
        return render(request, "node.html", **(await _node_ctx(request)))

    @page("nodes")
    async def node_gpus(request: Request) -> Response:
        return render(request, "node_gpus.html", **(await _node_ctx(request)))

    async def _node_ctx(request: Request) -> dict[str, Any]:
        name = _node_name(request)
        c = client(request)
        got = await run_in_threadpool(c.call, api.discovery.GetNode, discovery_pb2.GetNodeRequest(name=name))
        try:
            telemetry = await run_in_threadpool(c.node_telemetry, name, SPARK_POINTS)
            reports = list(telemetry.recent)
        except GpufedError as e:
            if e.code not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                raise
            reports = []  # offline, or nothing of it this token may see: no sparklines
        return {"node": _node_row(got.node), "gpus": _gpu_rows(got.node, reports), "name": name}

    @page("nodes", write=True)
    async def node_action(request: Request) -> Response:
        name = _node_name(request)
        action = request.path_params["action"]
        form = _bounded({k: str(v) for k, v in (await request.form()).items()})
        reason = form.get("reason", "").strip() or "from the console"
        c = client(request)
        if action == "cordon":
            await run_in_threadpool(
                c.call, api.admin.CordonNode, admin_pb2.CordonNodeRequest(name=name, reason=reason)
            )
        elif action == "uncordon":
            await run_in_threadpool(c.call, api.admin.UncordonNode, admin_pb2.UncordonNodeRequest(name=name))
        elif action == "drain":
            await run_in_threadpool(
                c.call, api.admin.DrainNode, admin_pb2.DrainNodeRequest(name=name, reason=reason)
            )
        else:
            raise BadInput(f"unknown node action {action!r}")
        return RedirectResponse(f"/{name}", status_code=303)

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
        Route("/reservations/{reservation_id}/cancel", cancel_reservation, methods=["POST"]),
        Route("/account", account, methods=["GET"]),
        Route("/account/quota", set_quota, methods=["POST"]),
        Route("/account/burst", set_burst, methods=["POST"]),
        Route("/usage", usage),
        Route("/audit", audit),
        Route("/audit/table", audit_table),
        Route("/nodes", nodes),
        Route("/providers/{provider}/nodes/{node_id}", node),
        Route("/providers/{provider}/nodes/{node_id}/gpus", node_gpus),
        Route("/providers/{provider}/nodes/{node_id}/{action}", node_action, methods=["POST"]),
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


SPARK_POINTS = 60  # reports per sparkline (2 minutes at the default 2 s)
SPARK_W, SPARK_H = 120, 22


def _node_name(request: Request) -> str:
    provider, node_id = request.path_params["provider"], request.path_params["node_id"]
    for part in (provider, node_id):
        if not (0 < len(part) <= 63 and all(ch.isalnum() or ch in "-." for ch in part)):
            raise BadInput("not a node name")
    return f"providers/{provider}/nodes/{node_id}"


def _node_row(n: Any) -> dict[str, Any]:
    return {
        "name": n.name,
        "state": common_pb2.NodeState.Name(n.state).removeprefix("NODE_STATE_"),
        "gpus": len([g for g in n.gpus if not g.parent_uuid]),
        "free": n.free_gpu_count,
        "model": n.gpus[0].model if n.gpus else "-",
        "country": n.location.country_code,
        "price": f"{n.price_per_gpu_hour:.2f}",
        "pool": n.pool_tenant or "federation",
    }


def sparkline(values: list[float | None], top: float) -> str:
    """SVG polyline points of `values` (None: a gap, drawn as the previous value) scaled to
    0..top, oldest left; "" without values."""
    known = [v for v in values if v is not None]
    if not known or top <= 0:
        return ""
    step = SPARK_W / max(1, len(values) - 1)
    last = known[0]
    pts = []
    for i, v in enumerate(values):
        last = v if v is not None else last
        y = SPARK_H - min(1.0, max(0.0, last / top)) * (SPARK_H - 2) - 1
        pts.append(f"{i * step:.1f},{y:.1f}")
    return " ".join(pts)


def _gpu_rows(node: Any, reports: list[Any]) -> list[dict[str, Any]]:
    series: dict[str, list[Any]] = {}
    for r in reports:
        for s in r.gpus:
            series.setdefault(s.uuid, []).append(s)
    rows = []
    for g in node.gpus:
        samples = series.get(g.uuid, [])
        util = [
            100 * s.gr_engine_active
            if s.HasField("gr_engine_active")
            else (s.utilization_gpu_percent if s.HasField("utilization_gpu_percent") else None)
            for s in samples
        ]
        temp = [float(s.temperature_celsius) if s.HasField("temperature_celsius") else None for s in samples]
        repair = (
            common_pb2.RepairAction.Name(g.repair.action).removeprefix("REPAIR_ACTION_")
            if g.HasField("repair") and g.repair.action > common_pb2.REPAIR_ACTION_RESTART_APP
            else ""
        )
        rows.append(
            {
                "uuid": g.uuid,
                "index": g.index,
                "model": f"{g.model} MIG {g.mig_profile}" if g.mig_profile else g.model,
                "health": health(g.health),
                "reasons": [(r.code, r.message) for r in g.health_reasons],
                "repair": repair,
                "lease": g.lease,
                "util": sparkline(util, 100.0),
                "util_now": f"{util[-1]:.0f} %" if util and util[-1] is not None else "",
                "temp": sparkline(temp, 100.0),
                "temp_now": f"{temp[-1]:.0f} C" if temp and temp[-1] is not None else "",
            }
        )
    return rows


def capacity_map(resp: discovery_pb2.SummarizeCapacityResponse) -> dict[str, dict[str, Any]]:
    """Per country: total and free GPUs, the models' split and the fill class of its share free
    (cap-0: none free ... cap-4: three quarters or more)."""
    out: dict[str, dict[str, Any]] = {}
    for b in resp.buckets:
        c = out.setdefault(b.country_code, {"total": 0, "free": 0, "models": {}})
        c["total"] += b.total_gpus
        c["free"] += b.free_gpus
        m = c["models"].setdefault(b.gpu_model, [0, 0])
        m[0] += b.free_gpus
        m[1] += b.total_gpus
    for c in out.values():
        share = c["free"] / c["total"] if c["total"] else 0.0
        c["class"] = "cap-0" if c["free"] == 0 else f"cap-{min(4, 1 + int(share * 4))}"
        c["models"] = sorted(c["models"].items())
    return out


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


QUOTA_FIELDS = {
    "tenants": ("max_gpus", "max_leases", "max_queued", "max_reserved_gpu_hours", "create_leases_per_second"),
    "providers": ("max_nodes", "max_gpus_per_node", "reports_per_second"),
}


def _quota_rows(got: admin_pb2.GetQuotaResponse) -> list[tuple[str, str]]:
    part = got.quota.tenant if got.quota.HasField("tenant") else got.quota.provider
    rows = [(f.name, _number(getattr(part, f.name))) for f in part.DESCRIPTOR.fields]
    if got.quota.HasField("tenant"):
        rows += [("in use: active leases", str(got.active_leases)), ("in use: GPUs held", str(got.held_gpus))]
    else:
        rows += [("in use: nodes", str(got.nodes))]
    return rows


def _number(v: float) -> str:
    return f"{int(v)}" if float(v).is_integer() else f"{v:g}"


def _when(ts: Any, seconds: bool = False) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M" + (":%S" if seconds else "")) if ts.seconds else ""


def _reservation_row(r: reservation_pb2.Reservation) -> dict[str, Any]:
    state = reservation_pb2.ReservationState.Name(r.state).removeprefix("RESERVATION_STATE_")
    return {
        "name": r.name,
        "id": r.name.removeprefix("reservations/"),
        "state": state,
        "gpus": r.gpu_count,
        "window": f"{_when(r.start_time)} .. {_when(r.end_time)}",
        "price": f"{r.price_per_hour:.2f} {r.currency_code}/h",
        "lease": r.lease,
        "live": state in ("SCHEDULED", "AT_RISK", "ACTIVE"),
    }


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
        "end": end
        if end
        else (f"#{lease.queue_position}" if state == "QUEUED" and lease.queue_position else ""),
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
