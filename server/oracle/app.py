"""The similarity-oracle HTTP API (FastAPI). `create_app(settings)` builds it; `fl-sim oracle
serve` runs it with uvicorn. OpenAPI at /openapi.json.

Every request passes the Guard (outermost of ours), which answers before reading the body:
no or unknown key 401 (except /v1/health and the docs), over the key's token bucket 429,
body over max_body_bytes 413; then the body is read and handed on. Before the answer's last
byte goes out, one audit row is written (a 4xx also counts as `rejected` for the key), so a
client that has its answer finds it in the log and in its usage. Inside, a
dependency checks the key's role (403), FastAPI checks JSON and schema (422), the handlers
decode images (415/413/422) before any budget is taken. Then the deployment's defenses
(fl_sim.oracle_defenses, shared with the in-process oracle): a blocked key is refused (403),
the face gate refuses images without a face (422 no_face), the stateful detector flags or
blocks a key whose queries crowd together (403 key_blocked); the key's and the identity's
budgets are taken atomically before scoring and given back if scoring fails, so a refused
request costs nothing; the scores are noised, rounded or reduced to a decision last. Every
refusal is in the audit log with its error code (`GET /v1/stats`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fl_sim.oracle_defenses import QueryRefused, StatefulDetector, gate_faces, output_kind, transform_scores
from server.oracle.backend import Backend
from server.oracle.images import ImageError, decode_array, decode_images
from server.oracle.ratelimit import TokenBuckets, retry_after
from server.oracle.schemas import (
    EnrollRequest,
    EnrollResponse,
    ErrorBody,
    Health,
    IdentityInfo,
    IdentityList,
    FlagInfo,
    SimilarityRequest,
    SimilarityResponse,
    Stats,
    UsageResponse,
)
from server.oracle.settings import OracleSettings
from server.oracle.store import AuditRow, IdentityExists, KeyRecord, Store

log = logging.getLogger("fl_sim.oracle")

BUDGET_RETRY_AFTER = 86400  # a used-up budget does not refill; the header is there for clients


class ApiError(Exception):
    def __init__(self, status: int, error: str, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason, self.headers = status, error, reason, headers


def error_response(status: int, error: str, reason: str, headers: dict[str, str] | None = None,
                   audit: AuditRow | None = None) -> JSONResponse:
    if audit is not None:
        audit.error = error  # the audit log keeps why a request was refused
    return JSONResponse({"error": error, "reason": reason}, status_code=status, headers=headers)


def _audit_of(request: Request) -> AuditRow | None:
    return getattr(request.state, "audit", None)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large", 415: "unsupported_media", 422: "invalid_request",
               429: "rate_limited"}


PUBLIC_PATHS = {"/v1/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


class Guard:
    """The front door, around everything else: authentication, the key's token bucket, the
    body size limit, and the audit log. All three rejections happen before the body is read."""

    def __init__(self, app: ASGIApp, store: Store, buckets: TokenBuckets, max_body_bytes: int) -> None:
        self.app, self.store, self.buckets, self.max_body_bytes = app, store, buckets, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        row = AuditRow(endpoint=f"{scope['method']} {scope['path']}"[:200])
        state = scope.setdefault("state", {})
        state["audit"] = row
        status = 500
        audited = False

        async def write_audit() -> None:
            nonlocal audited
            if audited:
                return
            audited = True
            row.status = status
            try:
                await anyio.to_thread.run_sync(self.store.record, row)
            except Exception:  # the audit log must not take the answer down with it
                log.exception("could not write the audit row for %s", row.endpoint)

        async def send_(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                await write_audit()  # audited before the answer is complete
            await send(message)

        try:
            rejection = await self._admit(scope, state, row)
            if rejection is None:
                body = await self._read_body(scope, receive)
                if body is None:
                    rejection = error_response(413, "body_too_large", f"request body over {self.max_body_bytes} bytes",
                                               audit=row)
            if rejection is not None:
                await rejection(scope, receive, send_)
                return
            sent = False

            async def replay() -> Message:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_)
        finally:
            await write_audit()  # if no answer went out (a crash, a client gone)

    async def _admit(self, scope: Scope, state: dict, row: AuditRow) -> JSONResponse | None:
        """None when the request may go on (its key, if any, in state["key"]); else the answer."""
        header = next((v for n, v in scope.get("headers", []) if n == b"authorization"), None)
        scheme, _, credentials = (header or b"").decode("latin-1").partition(" ")
        key = None
        if scheme.lower() == "bearer" and credentials.strip():
            key = await anyio.to_thread.run_sync(self.store.lookup_key, credentials.strip())
        if key is None:
            if scope["path"] in PUBLIC_PATHS:
                return None
            reason = "unknown API key" if header else "send the header 'Authorization: Bearer <key>'"
            return error_response(401, "unauthorized", reason, {"WWW-Authenticate": "Bearer"}, audit=row)
        state["key"] = key
        row.key_id = key.key_id
        await anyio.to_thread.run_sync(self.store.count_request, key.key_id)
        wait = self.buckets.take(key.key_id)
        if wait > 0:
            return error_response(429, "rate_limited", f"over {self.buckets.rate:g} requests per second for this key",
                                  {"Retry-After": retry_after(wait)}, audit=row)
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it is known to be over the limit."""
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > self.max_body_bytes:
                        return None
                except ValueError:
                    pass
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _validation_reason(exc: RequestValidationError) -> str:
    errors = exc.errors()
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    where = ".".join(loc)
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})"
    if not where and err.get("type") in ("missing", "model_attributes_type", "dict_type", "model_type"):
        return "request body: a JSON object is required (Content-Type: application/json)"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where or 'request body'}: {msg}{more}"


def create_app(settings: OracleSettings, backend: Backend | None = None, store: Store | None = None) -> FastAPI:
    store = store or Store(settings.db)
    backend = backend or Backend(settings.backend, settings.threads)
    others = store.backends() - {backend.name}
    if others:
        raise ValueError(f"the store {settings.db} holds templates of backend(s) {', '.join(sorted(others))}; "
                         f"this service runs {backend.name!r}: use another db or the same backend")
    buckets = TokenBuckets(settings.rate_per_second)
    defenses = settings.defenses
    detector = StatefulDetector(defenses.detector) if defenses.detector is not None else None
    secret = store.secret()
    errors = {code: {"model": ErrorBody} for code in (401, 403, 404, 413, 415, 422, 429)}

    app = FastAPI(title="fl-sim similarity oracle", version="1",
                  description="A face-recognition scoring service: enrolled identities are answered with "
                              "similarity scores only; templates never leave it.",
                  responses=errors)
    app.state.settings, app.state.store, app.state.backend = settings, store, backend
    app.add_middleware(Guard, store=store, buckets=buckets, max_body_bytes=settings.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error, exc.reason, exc.headers, audit=_audit_of(request))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _validation_reason(exc), audit=_audit_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "error"), str(exc.detail),
                              getattr(exc, "headers", None), audit=_audit_of(request))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(500, "internal", "the oracle failed on this request; it is logged",
                              audit=_audit_of(request))

    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <key>")

    def authorised(*roles: str) -> Callable[..., KeyRecord]:
        """The Guard has authenticated the key and applied its rate; here its role is checked.
        (The HTTPBearer parameter only documents the scheme in /openapi.json.)"""

        def dependency(request: Request,
                       _: HTTPAuthorizationCredentials | None = Depends(bearer)) -> KeyRecord:
            key: KeyRecord | None = getattr(request.state, "key", None)
            if key is None:  # not reached behind the Guard; kept so a route can never be open by mistake
                raise ApiError(401, "unauthorized", "send the header 'Authorization: Bearer <key>'")
            if key.role not in roles:
                raise ApiError(403, "forbidden", f"this needs a key with role {' or '.join(roles)}; "
                               f"this key's role is {key.role}")
            return key

        return dependency

    def budget_of(key: KeyRecord) -> int | None:
        return key.budget if key.budget is not None else settings.query_budget

    def check_batch(n: int) -> None:
        if n > settings.max_batch:
            raise ApiError(413, "batch_too_large", f"{n} images in one request; at most {settings.max_batch}")

    def crops_of(images: list[str]):
        try:
            return decode_images(images, backend.size, settings.aligner, settings.max_pixels)
        except ImageError as exc:
            raise ApiError(exc.status, exc.code, exc.reason) from None

    # -- routes -------------------------------------------------------------------------
    @app.get("/v1/health", response_model=Health, tags=["service"])
    def health() -> Health:
        return Health(backend=backend.name, identities=store.count_identities())

    @app.post("/v1/identities", status_code=201, response_model=EnrollResponse, tags=["admin"])
    def enroll_identity(body: EnrollRequest, request: Request,
                        key: KeyRecord = Depends(authorised("admin"))) -> EnrollResponse:
        audit = request.state.audit
        audit.identity, audit.images = body.id, len(body.images)
        check_batch(len(body.images))
        if store.has_identity(body.id):
            raise ApiError(409, "identity_exists", f"identity {body.id!r} is already enrolled; delete it first")
        crops = crops_of(body.images)
        try:
            record = store.add_identity(body.id, backend.template(crops), len(crops), backend.name)
        except IdentityExists as exc:
            raise ApiError(409, "identity_exists", str(exc)) from None
        return EnrollResponse(id=record.id, images=record.images)

    @app.get("/v1/identities", response_model=IdentityList, tags=["admin"])
    def list_identities(key: KeyRecord = Depends(authorised("admin"))) -> IdentityList:
        return IdentityList(identities=[IdentityInfo(id=r.id, images=r.images, created=r.created)
                                        for r in store.identities()])

    @app.delete("/v1/identities/{identity}", status_code=204, response_class=Response, tags=["admin"])
    def delete_identity(identity: str, request: Request, key: KeyRecord = Depends(authorised("admin"))) -> Response:
        request.state.audit.identity = identity[:64]
        if not store.delete_identity(identity):
            raise ApiError(404, "unknown_identity", f"no identity {identity!r}")
        return Response(status_code=204)

    @app.post("/v1/identities/{identity}/similarity", response_model=SimilarityResponse, tags=["query"])
    def similarity(identity: str, body: SimilarityRequest, request: Request,
                   key: KeyRecord = Depends(authorised("query", "admin"))) -> SimilarityResponse:
        audit = request.state.audit
        audit.identity = identity[:64]
        template = store.template(identity)
        if template is None:
            raise ApiError(404, "unknown_identity", f"no identity {identity!r}")
        if body.images is not None:
            check_batch(len(body.images))
            crops = crops_of(body.images)
        else:
            try:
                crops = decode_array(body.array.dtype, body.array.shape, body.array.data, backend.size,
                                     settings.aligner, settings.max_pixels, settings.max_batch)
            except ImageError as exc:
                raise ApiError(exc.status, exc.code, exc.reason) from None
        n = len(crops)
        audit.images = n
        if store.is_blocked(key.key_id):
            raise ApiError(403, "key_blocked", "this key was blocked by the oracle's query-pattern detector")
        try:
            if defenses.face_gate is not None:
                gate_faces(crops, defenses.face_gate)
            if detector is not None:
                check_pattern(key, crops, n)
        except QueryRefused as exc:
            raise ApiError(exc.status, exc.code, exc.reason) from None
        budget = budget_of(key)
        used = store.reserve_queries(key.key_id, n, budget, identity, defenses.identity_budget)
        if used is None:
            spent = store.usage(key.key_id).queries
            raise ApiError(429, "budget_exhausted", f"this key's query budget is {budget} images and {spent} are "
                           f"used; {n} more do not fit", {"Retry-After": str(BUDGET_RETRY_AFTER)})
        if used == "identity":
            raise ApiError(429, "identity_budget_exhausted",
                           f"identity {identity!r} may be queried {defenses.identity_budget} times in all and "
                           f"{store.identity_queries(identity)} are used; {n} more do not fit",
                           {"Retry-After": str(BUDGET_RETRY_AFTER)})
        try:
            raw = backend.scores(crops, template)
        except BaseException:
            store.refund_queries(key.key_id, n, identity)
            raise
        scores = transform_scores(raw, crops, identity, defenses, secret)
        return SimilarityResponse(scores=scores.tolist(), output=output_kind(defenses), queries_used=used,
                                  budget_left=None if budget is None else budget - used)

    def check_pattern(key: KeyRecord, crops, n: int) -> None:
        """The stateful detector: a flagged batch is recorded; under `block` the key is refused."""
        verdict = detector.observe(key.key_id, crops)
        if not verdict.flagged:
            return
        block = defenses.detector.action == "block"
        store.add_flag(key.key_id, store.usage(key.key_id).queries + n, verdict.distance, blocked=block)
        log.warning("key %s flagged by the query-pattern detector (mean k-NN distance %.3f)%s",
                    key.key_id, verdict.distance, "; blocked" if block else "")
        if block:
            raise QueryRefused(403, "key_blocked", "queries too close to this key's earlier ones (mean distance "
                               f"{verdict.distance:.3f} to the {defenses.detector.k} nearest < "
                               f"{defenses.detector.threshold:g}); the key is blocked")

    @app.get("/v1/usage", response_model=UsageResponse, tags=["query"])
    def usage(key: KeyRecord = Depends(authorised("query", "admin"))) -> UsageResponse:
        u = store.usage(key.key_id)
        budget = budget_of(key)
        return UsageResponse(key_id=key.key_id, role=key.role, requests=u.requests, queries=u.queries,
                             rejected=u.rejected, budget_left=None if budget is None else max(0, budget - u.queries))

    @app.get("/v1/stats", response_model=Stats, tags=["admin"])
    def stats(key: KeyRecord = Depends(authorised("admin"))) -> Stats:
        """The deployment's defenses, refusals by error code, and the detector's flags."""
        return Stats(defenses=defenses.active(), rejections=store.rejections(),
                     flags=[FlagInfo(key_id=f.key_id, time=f.time, queries=f.queries, distance=f.distance,
                                     blocked=f.blocked) for f in store.flags()])

    return app


def serve(settings: OracleSettings) -> None:
    """Run the service with uvicorn until interrupted."""
    import uvicorn

    app = create_app(settings)
    store: Store = app.state.store
    active = ", ".join(settings.defenses.active()) or "none"
    print(f"oracle: http://{settings.host}:{settings.port} backend {settings.backend}, "
          f"{store.count_identities()} identities, store {settings.db}, defenses: {active}", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                limit_concurrency=256, timeout_graceful_shutdown=5)


__all__ = ["create_app", "serve", "ApiError"]
