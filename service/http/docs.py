"""The API docs, /docs (Swagger UI) and /redoc (ReDoc), served by the app itself: their scripts and styles come
from the fastapi-offline package on PyPI, not from a public CDN, so the pages work offline and no outside script
runs on the origin that keeps the playground's token. The pages carry no inline script (Swagger UI starts from
static/swagger-init.js), so the Content-Security-Policy stays on the app's own origin; their CSP allows inline
styles, which both UIs set at run time.
"""

from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, Response

ASSETS = resources.files("fastapi_offline") / "static"
OWN_ASSETS = resources.files("service.http") / "static"
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".png": "image/png"}
SERVED = {
    "swagger-ui-bundle.js": ASSETS,
    "swagger-ui.css": ASSETS,
    "redoc.standalone.js": ASSETS,
    "favicon.png": ASSETS,
    "swagger-init.js": OWN_ASSETS,
}
CSP = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; worker-src 'self' blob:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
)
CACHE = {"Cache-Control": "public, max-age=86400"}

router = APIRouter(include_in_schema=False)


def _page(title: str, body: str, styles: str = "") -> HTMLResponse:
    html = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="icon" href="/docs/assets/favicon.png">
{styles}
</head>
<body>
{body}
</body>
</html>
"""
    return HTMLResponse(html, headers={"Content-Security-Policy": CSP})


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    return _page(
        "Bespoke Punks API",
        '<div id="swagger-ui"></div>\n<script src="/docs/assets/swagger-ui-bundle.js"></script>\n'
        '<script src="/docs/assets/swagger-init.js"></script>',
        '<link rel="stylesheet" href="/docs/assets/swagger-ui.css">',
    )


@router.get("/redoc")
async def redoc() -> HTMLResponse:
    return _page(
        "Bespoke Punks API (ReDoc)",
        '<redoc spec-url="/openapi.json"></redoc>\n<script src="/docs/assets/redoc.standalone.js"></script>',
    )


@router.get("/docs/assets/{name}")
async def asset(name: str) -> Response:
    folder = SERVED.get(name)
    if folder is None:
        raise HTTPException(404, "not found")
    suffix = name[name.rindex(".") :]
    return Response((folder / name).read_bytes(), media_type=MEDIA_TYPES[suffix], headers=CACHE)
