"""The memory API: documents (upload or URL, ingested into vector memory), retrieval, and sessions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from keel.errors import InputError
from keel.interaction.auth import Reader, Writer
from keel.interaction.deps import App, errors, problem
from keel.interaction.schemas import RequestBody

router = APIRouter(prefix="/v1", tags=["memory"])
ERRORS = errors("No such document for this tenant")


class DocumentView(BaseModel):
    """A document in vector memory."""

    id: str = Field(description="Derived from the content: the same bytes always give the same id.")
    status: str = Field(description="`ingested`, `skipped` (see warnings/errors), `failed`, or `ingesting`.")
    pages: int
    chunks: int = Field(description="Chunks embedded into vector memory.")
    source: str = Field(description="`upload:<filename>` or the URL it was fetched from.")
    media_type: str
    size: int
    sha256: str
    space: str | None = Field(description="The embedding space (model@version) of its chunks.")
    warnings: list[dict[str, Any]] = Field(description="e.g. `document_encrypted`, `ocr_used`, `ocr_low_confidence`.")
    errors: list[dict[str, Any]] = Field(description="Why it was skipped: `document_corrupt`, `document_too_large`, …")
    metadata: dict[str, Any]
    created_at: float
    expires_at: float | None


class IngestUrl(RequestBody):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=4096, description="An http(s) URL; private and internal addresses are refused.")
    password: str | None = Field(None, max_length=1024, description="Opens an encrypted PDF; never stored.")


class SearchBody(RequestBody):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1, max_length=2000)
    k: int = Field(5, ge=1, le=100)
    documents: list[str] | None = Field(None, max_length=100, description="Only these document ids.")


EXAMPLE = {
    "id": "doc_5c1e0b7f3a9d4e2f8a6b1c0d",
    "status": "skipped",
    "pages": 0,
    "chunks": 0,
    "source": "upload:contract-c.pdf",
    "media_type": "application/pdf",
    "size": 48213,
    "sha256": "9f2c…",
    "space": None,
    "warnings": [
        {
            "type": "document_encrypted",
            "message": "the PDF is encrypted and no password was given",
            "hint": "ingest it again with its password",
        }
    ],
    "errors": [],
    "metadata": {},
    "created_at": 1795000000.0,
    "expires_at": 1797592000.0,
}


async def _read_request(request: Request) -> tuple[bytes | None, str, str | None, str | None]:
    """``(data, source, media_type, password)`` from a multipart upload, or ``(None, url, None, password)``
    from a JSON body."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1, max_fields=4)
        except HTTPException as exc:  # Starlette's 400 for a multipart body it will not parse: too many parts, …
            raise InputError(
                f"multipart body refused: {exc.detail}",
                detail={"errors": [{"pointer": "", "message": str(exc.detail)}]},
            ) from None
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise InputError(
                    "multipart body needs a `file` field with the document",
                    detail={"errors": [{"pointer": "/file", "message": "missing"}]},
                )
            data = await upload.read()
            password = form.get("password")
            filename, declared = upload.filename or "document", upload.content_type
        finally:
            await form.close()  # the spooled upload
        if not data:
            empty: dict[str, object] = {"errors": [{"pointer": "/file", "message": "empty"}]}
            raise InputError("the uploaded file is empty", detail=empty)
        return (
            data,
            f"upload:{filename}",
            declared,
            password if isinstance(password, str) and password else None,
        )
    if content_type.startswith("application/json"):
        try:
            body = IngestUrl.model_validate_json(await request.body())
        except ValidationError as exc:
            raise InputError(
                "body does not match {url, password?}",
                detail={
                    "errors": [
                        {"pointer": "/" + "/".join(map(str, e["loc"])), "message": e["msg"]} for e in exc.errors()
                    ]
                },
            ) from None
        return None, body.url, None, body.password
    raise InputError(
        f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data with `file`, "
        'or application/json {"url": ...}'
    )


@router.post(
    "/documents",
    response_model=DocumentView,
    status_code=201,
    responses={
        **ERRORS,
        200: {"description": "The same bytes were ingested before: the stored document", "model": DocumentView},
        201: {
            "description": "Ingested, or skipped with its reason",
            "content": {"application/json": {"example": EXAMPLE}},
        },
        413: problem("Larger than KEEL_INGEST_MAX_BYTES"),
        422: problem("No file, an empty file, a bad JSON body, or a URL the SSRF rules refuse"),
    },
    summary="Ingest a document",
    operation_id="ingestDocument",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "password": {"type": "string", "description": "Opens an encrypted PDF; never stored."},
                        },
                    }
                },
                "application/json": {"schema": IngestUrl.model_json_schema()},
            },
        }
    },
)
async def ingest_document(request: Request, keel: App, key: Writer) -> JSONResponse:
    """Parse (in a resource-limited child process: a PDF bomb cannot take the server down), OCR pages without a
    text layer, chunk by tokens, embed, and store in vector memory. A document that cannot be ingested answers
    with `status: skipped` and the reason: encrypted (a warning: send it again with `password`), corrupt, too
    large, a parser bomb, or unreachable after 3 retries. Ingesting the same bytes again returns the stored
    document (200)."""
    data, source, media_type, password = await _read_request(request)
    if data is not None:
        done = await keel.ingest_bytes(key.tenant, data, source=source, media_type=media_type, password=password)
    else:
        done = await keel.ingest_url(key.tenant, source, password=password)
    doc = done.document
    return JSONResponse(
        DocumentView(**doc.public()).model_dump(mode="json"),
        status_code=201 if done.fresh else 200,
        headers={"Location": f"/v1/documents/{doc.id}"},
    )


@router.get(
    "/documents/{document_id}",
    response_model=DocumentView,
    responses=ERRORS,
    summary="A document",
    operation_id="getDocument",
)
async def get_document(document_id: str, keel: App, key: Reader) -> DocumentView:
    return DocumentView(**(await keel.document(key.tenant, document_id)).public())


@router.get(
    "/documents",
    response_model=list[DocumentView],
    responses=errors(),
    summary="Documents",
    operation_id="listDocuments",
)
async def list_documents(
    keel: App, key: Reader, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> list[DocumentView]:
    return [DocumentView(**d.public()) for d in await keel.documents(key.tenant, limit=limit)]


@router.delete(
    "/documents/{document_id}",
    status_code=204,
    responses=ERRORS,
    summary="Forget a document",
    operation_id="deleteDocument",
)
async def delete_document(document_id: str, keel: App, key: Writer) -> Response:
    """Delete the document and every chunk of it, in every embedding space."""
    await keel.delete_document(key.tenant, document_id)
    return Response(status_code=204)


@router.post("/memory/search", responses=ERRORS, summary="Search vector memory", operation_id="searchMemory")
async def search(body: SearchBody, keel: App, key: Reader) -> dict[str, Any]:
    """The `k` passages closest to `query`, with cosine scores and a confidence signal (`confidence` 0–1 and
    `level` high/medium/low/none). Only chunks of the configured embedding model's version are compared."""
    found = await keel.search(key.tenant, body.query, k=body.k, documents=body.documents)
    return found.summary(text_chars=4000)


@router.get("/memory/spaces", responses=errors(), summary="Embedding spaces", operation_id="listEmbeddingSpaces")
async def spaces(keel: App, key: Reader) -> dict[str, Any]:
    """Every embedding space (model@version) that holds chunks, and which one queries use now."""
    current, spaces = await keel.spaces()
    return {"current": current, "spaces": spaces}


@router.get("/sessions/{session_id}", responses=ERRORS, summary="A session's memory", operation_id="getSession")
async def get_session(session_id: str, keel: App, key: Reader) -> dict[str, Any]:
    session = await keel.session(key.tenant, session_id)
    return {
        "id": session.id,
        "expires_at": session.expires_at,
        "context": session.context,
        "turns": [{"seq": t.seq, "role": t.role, "content": t.content, "at": t.at} for t in session.turns],
    }


@router.delete(
    "/sessions/{session_id}",
    status_code=204,
    responses=ERRORS,
    summary="Forget a session",
    operation_id="deleteSession",
)
async def delete_session(session_id: str, keel: App, key: Writer) -> Response:
    await keel.delete_session(key.tenant, session_id)
    return Response(status_code=204)
