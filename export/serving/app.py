"""The Starlette app over an :class:`export.serving.service.OcrService`.

Routes:

* ``POST /ocr``: a multipart file (field ``image``) or JSON ``{"image": <base64>}`` ->
  ``{"variant", "lines": [{"text", "score", "box"}], "ms"}``; ``Routing.variant_header`` forces a variant,
  ``Routing.sticky_header`` routes by key. Errors: ``{"error": "<one line>"}`` with 400 (undecodable, too many
  pixels, bad header), 413 (body over ``Limits.max_request_bytes``), 415, 429 (full), 500, 504 (timeout).
* ``GET /healthz``, ``GET /status`` (variants, folders, share, rollout, guardrails, events), ``GET /metrics``.
* ``POST /admin/promote`` (optional JSON ``{"share": 0.5}``; default: the next rollout step) and
  ``POST /admin/rollback``: with the API key (401 without).
"""
import asyncio
import contextlib
import dataclasses
import json
import logging
import time

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from export.serving.images import (FORM_FIELD, JSON_TYPE, MULTIPART_TYPE, RequestError, decode_image,
                                   image_bytes_from_json)

logger = logging.getLogger("export.serving")

TICK_S = 0.5  # how often auto promotion is considered


def error_response(status, message, headers=None):
    """``{"error": message}`` with ``status``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request, limit):
    """The request body, at most ``limit`` bytes (RequestError 413 beyond, from Content-Length when it is sent)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise RequestError(413, f"request body is {int(length)} bytes, over the limit of {limit} "
                                f"(Limits.max_request_bytes); send a smaller image")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes (Limits.max_request_bytes); "
                                    f"send a smaller image")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request, body):
    """The encoded image of a multipart or JSON body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == JSON_TYPE:
        return image_bytes_from_json(body)
    if content_type != MULTIPART_TYPE:
        raise RequestError(415, f"content type {content_type or '(none)'!r} is not accepted; send "
                                f"{MULTIPART_TYPE} with an {FORM_FIELD!r} file, or {JSON_TYPE} "
                                f"{{\"image\": <base64>}}")
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def replay():
        yield body

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=1, max_fields=8).parse()
    except (MultiPartException, KeyError, ValueError) as exc:  # KeyError: no boundary in the content type
        reason = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        raise RequestError(400, f"malformed multipart body ({reason}); send -F {FORM_FIELD}=@page.jpg")
    try:
        upload = form.get(FORM_FIELD)
        if upload is None or isinstance(upload, str):
            raise RequestError(400, f"multipart body has no file field {FORM_FIELD!r}; send the image as "
                                    f"-F {FORM_FIELD}=@page.jpg")
        return await upload.read()
    finally:
        await form.close()


def line_json(line):
    """One OcrLine as the API's ``{"text", "score", "box"}``."""
    return {"text": line.text, "score": round(float(line.score), 4), "box": [list(p) for p in line.points]}


async def ocr(request):
    """``POST /ocr``: admit, read, decode, route, run, answer; then the shadow run."""
    service = request.app.state.service
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    deadline = loop.time() + service.cfg.Limits.timeout_s
    if not service.try_admit():
        service.record_response(None, 429, 0.0)
        return error_response(429, service.overloaded_message(), {"Retry-After": "1"})
    variant = None
    try:
        limits = service.cfg.Limits
        body = await read_body(request, limits.max_request_bytes)
        data = await image_bytes(request, body)
        image = await asyncio.to_thread(decode_image, data, limits.max_image_pixels)
        variant = service.route(request.headers)
        lines, _ = await service.run(variant, image, deadline)
        service.shadow(variant, image, lines)
        seconds = time.perf_counter() - started
        service.record_response(variant, 200, seconds)
        return JSONResponse({"variant": variant, "lines": [line_json(line) for line in lines],
                             "ms": round(seconds * 1000.0, 2)})
    except RequestError as exc:
        service.record_response(variant, exc.status, time.perf_counter() - started)
        return error_response(exc.status, str(exc))
    except Exception as exc:  # noqa: BLE001  (one line for the client, one for the log, never a traceback page)
        logger.error("POST /ocr failed: %s: %s", type(exc).__name__, exc)
        service.record_response(variant, 500, time.perf_counter() - started)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
    finally:
        service.leave()


async def healthz(request):
    """``GET /healthz``: the process answers (the models are loaded before the port opens)."""
    return JSONResponse({"status": "ok"})


async def status(request):
    """``GET /status``: see :meth:`export.serving.service.OcrService.status`."""
    return JSONResponse(request.app.state.service.status())


async def metrics(request):
    """``GET /metrics``: Prometheus' text format."""
    return Response(request.app.state.service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def promote(request):
    """``POST /admin/promote``: the next rollout step, or ``{"share": x}``; with the API key."""
    service = request.app.state.service
    try:
        service.check_admin(request.headers)
        body = await read_body(request, 4096)
        share = _share_from(body)
    except RequestError as exc:
        return error_response(exc.status, str(exc))
    event = service.promote("manual (POST /admin/promote)", share)
    return JSONResponse({"event": dataclasses.asdict(event), "routing": service.router.status()})


def _share_from(body):
    if not body.strip():
        return None
    try:
        data = json.loads(body)
    except ValueError:
        raise RequestError(400, "body is not JSON; send nothing (the next rollout step) or {\"share\": 0.5}")
    share = data.get("share") if isinstance(data, dict) else None
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0.0 <= share <= 1.0 \
            or set(data) != {"share"}:
        raise RequestError(400, "send {\"share\": <a number from 0 to 1>} or no body (the next rollout step)")
    return float(share)


async def rollback(request):
    """``POST /admin/rollback``: share 0 now; with the API key."""
    service = request.app.state.service
    try:
        service.check_admin(request.headers)
    except RequestError as exc:
        return error_response(exc.status, str(exc))
    event = service.rollback("manual (POST /admin/rollback)", "manual")
    return JSONResponse({"event": dataclasses.asdict(event) if event else None, "routing": service.router.status()})


async def _ticker(service):
    while True:
        await asyncio.sleep(TICK_S)
        service.tick()


def build_app(service):
    """The Starlette app serving ``service``; its lifespan runs auto promotion and closes the service."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        ticker = asyncio.get_running_loop().create_task(_ticker(service))
        try:
            yield
        finally:
            ticker.cancel()
            await service.close()

    app = Starlette(routes=[Route("/ocr", ocr, methods=["POST"]), Route("/healthz", healthz),
                            Route("/status", status), Route("/metrics", metrics),
                            Route("/admin/promote", promote, methods=["POST"]),
                            Route("/admin/rollback", rollback, methods=["POST"])],
                    lifespan=lifespan)
    app.state.service = service
    return app
