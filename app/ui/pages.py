"""/ui: the dashboard's pages and static files.

Pages are templates only: the browser holds the team's API key (sessionStorage)
and its scripts read every job through the public /v1 API with it as the bearer
token, so the server never renders a team's data and a page needs no key to load.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from pivotmerge import __version__

from app.errors import ApiError

HERE = Path(__file__).parent
STATIC = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(prefix="/ui", include_in_schema=False)


def job_kinds(request: Request) -> list[dict[str, str]]:
    """The kinds of job the dashboard lists, as declared (workers.kinds): kind, /v1 collection and label."""
    return [{"kind": k.name, "collection": k.collection, "label": k.label} for k in request.app.state.kinds]


STATES = ["waiting", "queued", "running", "cancelling", "succeeded", "failed", "cancelled"]


# Scripts, styles and connections from this origin only: a page holding a team's key runs no other code.
# Downloads are blob: URLs made by the page's script.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def page(request: Request, template: str, title: str, **context: object) -> HTMLResponse:
    return templates.TemplateResponse(request, template, {"title": title, "kinds": job_kinds(request), "states": STATES,
                                                          "version": __version__, **context}, headers=PAGE_HEADERS)


@router.get("")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/jobs")


@router.get("/sign-in")
def sign_in(request: Request) -> HTMLResponse:
    return page(request, "sign_in.html", "Sign in")


@router.get("/jobs")
def jobs(request: Request) -> HTMLResponse:
    return page(request, "jobs.html", "Jobs")


@router.get("/compare")
def compare(request: Request) -> HTMLResponse:
    return page(request, "compare.html", "Compare merges")


@router.get("/new")
def new_merge(request: Request) -> HTMLResponse:
    return page(request, "new_merge.html", "New merge")


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    # Only the files shipped in static/ (no sub-folders), so a name cannot leave the folder.
    if name not in {p.name for p in STATIC.iterdir()}:
        raise ApiError(404, f"no static file {name!r}")
    return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})


@router.get("/{collection}/{job_id}")
def job(request: Request, collection: str, job_id: str) -> HTMLResponse:
    if collection not in {k["collection"] for k in job_kinds(request)}:
        raise ApiError(404, f"no page /ui/{collection}")
    return page(request, "job.html", "Job", collection=collection, job_id=job_id)
