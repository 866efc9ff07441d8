"""The BentoML service: a thin HTTP shell around `ServingRuntime`.

Run: `bentoml serve ml_lifecycle.serving.service:Predictor --host 127.0.0.1 --port 3000`
(`make serve`). The dataset comes from ML_LIFECYCLE_DATASET / ML_LIFECYCLE_HOME, the model from
the registry's `champion` alias (followed live: a promotion or rollback swaps the model without
a restart). Set ML_LIFECYCLE_SHADOW=1 to also score the challenger (logged, not returned).

Routes: POST /predict (one record, the bare JSON object), POST /predict_batch ({"records": [...]}),
POST /predict_columns ({"columns": {"<field>": [...], ...}}: the same batch as one list per field,
answered as lists; much less JSON and validation per row), POST /predict_arrow (the batch as an
Arrow IPC stream, content-type application/vnd.apache.arrow.stream, one column per field;
answered as an Arrow IPC stream: nothing to parse), POST /events ({"events": [...]}: rows with their outcomes, keeping history features current),
POST /labels ({"labels": [{"request_id": ..., "label": ...}]}), POST /model (what is served).
"""

from __future__ import annotations

import gc
import os

# OpenMP (LightGBM's threads) reads this once, when LightGBM loads it: set it before the imports
# below. By default libgomp keeps a thread that has finished its share of a prediction spinning
# for 300,000 turns (GOMP_SPINCOUNT) in case more work comes. Between two batches of a request
# stream that is most of a core, taken from the HTTP loop, the inference log's flush thread and
# the other workers: a 1000-row /predict_arrow cost 22.6 ms of CPU with the spin and 15.8 ms
# without, in the same 12 ms of wall time. "passive": an idle OpenMP thread sleeps at once.
# An OMP_WAIT_POLICY set in the environment is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
# Polars writes the inference log's big commits (nothing else in the service uses it): one
# thread, beside the request on the other core (a 25,000-row write took 24-29 ms of CPU on one
# thread, 30-31 ms on two). Read when Polars is first imported (below).
os.environ.setdefault("POLARS_MAX_THREADS", "1")
from datetime import date, datetime
from typing import Annotated, Any

import bentoml
import pyarrow as pa
from bentoml.exceptions import InvalidArgument
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    create_model,
    model_validator,
)
from starlette.responses import Response

from ml_lifecycle.serving.request_validation import BatchValidator, InvalidValue
from ml_lifecycle.serving.runtime import (
    RequestError,
    RequestField,
    ServingRuntime,
    configured_workers,
)
from ml_lifecycle.settings import dataset_spec_path
from ml_lifecycle.spec import load_spec

MAX_BATCH = int(os.environ.get("ML_LIFECYCLE_MAX_BATCH", "10000"))
MAX_BODY_BYTES = int(os.environ.get("ML_LIFECYCLE_MAX_BODY_BYTES", str(16 * 1024 * 1024)))
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_INT_RANGES = {
    "TINYINT": (-(2**7), 2**7 - 1),
    "SMALLINT": (-(2**15), 2**15 - 1),
    "INTEGER": (-(2**31), 2**31 - 1),
    "BIGINT": (-(2**63), 2**63 - 1),
    "HUGEINT": (-(2**63), 2**63 - 1),
    "UTINYINT": (0, 2**8 - 1),
    "USMALLINT": (0, 2**16 - 1),
    "UINTEGER": (0, 2**32 - 1),
    "UBIGINT": (0, 2**64 - 1),
}


def _naive(value: datetime) -> datetime:
    if value.tzinfo is not None:
        raise ValueError(
            "expected the dataset's local date-time (e.g. 2024-05-01T10:30:00): "
            "a UTC offset or an epoch number would shift it"
        )
    return value


def _field_type(spec_field: RequestField) -> Any:
    python_type: Any = spec_field.python_type
    if python_type is datetime and "ZONE" not in spec_field.dtype.upper():
        # ISO strings from JSON, as naive as the column: Arrow would turn "10:00+02:00" (or
        # an epoch number) into 08:00 UTC, a different wall-clock time than the data's.
        return Annotated[datetime, Field(strict=False), AfterValidator(_naive)]
    if python_type is datetime:
        return Annotated[datetime, Field(strict=False)]
    if python_type is date:
        return Annotated[date, Field(strict=False)]
    if python_type is float:
        # Strict: a JSON integer is a float, but `true` or "1.5" is a wrong type (400).
        return Annotated[float, Field(allow_inf_nan=False)]
    if python_type is int:
        # JSON integers are unbounded: out of the column's range is a 400, not an overflow.
        low, high = _INT_RANGES.get(spec_field.dtype.split("(")[0].upper(), _INT_RANGES["BIGINT"])
        return Annotated[int, Field(ge=low, le=high)]
    return python_type


def _model(name: str, fields: list[RequestField], all_optional: bool = False) -> type[BaseModel]:
    definitions: dict[str, Any] = {}
    for spec_field in fields:
        python_type = _field_type(spec_field)
        if spec_field.required and not all_optional:
            # Required: the key must be sent; a nullable one may be null (as in the data).
            required_type = python_type | None if spec_field.nullable else python_type
            definitions[spec_field.name] = (required_type, Field(description=spec_field.dtype))
        else:
            definitions[spec_field.name] = (
                python_type | None,
                Field(None, description=spec_field.dtype),
            )
    return create_model(name, __config__=STRICT, **definitions)


class _EqualLengths(BaseModel):
    model_config = STRICT

    @model_validator(mode="after")
    def _same_length(self) -> _EqualLengths:
        lengths = {name: len(values) for name, values in self if values is not None}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"every column needs one value per record; lengths: {lengths}")
        return self


def _columns_model(name: str, fields: list[RequestField]) -> type[BaseModel]:
    """One list per request field (same rules per value as `Record`), 1 to MAX_BATCH long."""
    definitions: dict[str, Any] = {}
    for spec_field in fields:
        item = _field_type(spec_field)
        if spec_field.required:
            item = item | None if spec_field.nullable else item
            definitions[spec_field.name] = (
                Annotated[list[item], Field(min_length=1, max_length=MAX_BATCH)],
                Field(description=f"{spec_field.dtype}, one per record"),
            )
        else:
            definitions[spec_field.name] = (
                Annotated[list[item | None], Field(min_length=1, max_length=MAX_BATCH)] | None,
                Field(None, description=f"{spec_field.dtype}, one per record"),
            )
    return create_model(name, __base__=_EqualLengths, **definitions)


# Worker processes (BentoML `workers`): each has its own runtime, log files and embedded online
# store, kept in step through the event journal when there are several.
WORKERS = configured_workers()

RUNTIME = ServingRuntime(
    load_spec(dataset_spec_path()),
    shared_events=WORKERS > 1,
    shadow=os.environ.get("ML_LIFECYCLE_SHADOW", "") not in ("", "0", "false"),
    max_batch=MAX_BATCH,
    # Group commit of the prediction log: at most this many seconds of predictions are lost
    # if the worker is killed (the issue allows one second).
    log_flush_interval=float(os.environ.get("ML_LIFECYCLE_LOG_FLUSH_S", "0.5")),
)
Record = _model("Record", RUNTIME.fields)
Columns = _columns_model("Columns", RUNTIME.fields)
Event = _model("Event", RUNTIME.event_fields)


def _checker(spec_field: RequestField):
    """Per-column check of a type the batch validator does not vectorise (dates, structs)."""
    item = _field_type(spec_field)
    adapter = TypeAdapter(list[item | None], config=STRICT)

    def check(values: list[Any]) -> None:
        try:
            adapter.validate_python(values)
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            raise InvalidValue(int(first["loc"][0]), first["msg"]) from None

    return check


# Batches: `Record`'s rules checked column by column (request_validation.py), not one pydantic
# model per record; the OpenAPI schema still documents the records and columns exactly.
VALIDATOR = BatchValidator(RUNTIME.fields, MAX_BATCH, _INT_RANGES, _checker)
_RECORDS_SCHEMA = {
    "type": "array",
    "items": Record.model_json_schema(),
    "minItems": 1,
    "maxItems": MAX_BATCH,
}


class Batch(BaseModel):
    model_config = STRICT
    records: Annotated[list[Any], WithJsonSchema(_RECORDS_SCHEMA)]


class ColumnBatch(BaseModel):
    model_config = STRICT
    columns: Annotated[dict[str, Any], WithJsonSchema(Columns.model_json_schema())]


class Events(BaseModel):
    model_config = STRICT
    events: list[Event] = Field(min_length=1, max_length=MAX_BATCH)  # type: ignore[valid-type]


class Label(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    request_id: str = Field(min_length=1, max_length=200)
    label: float | int | str | bool


class Labels(BaseModel):
    model_config = STRICT
    labels: list[Label] = Field(min_length=1, max_length=MAX_BATCH)


ARROW_STREAM = "application/vnd.apache.arrow.stream"
ARROW_ROUTE = "/predict_arrow"
_ARROW_BODY = "ml_lifecycle.arrow_body"  # where the middleware leaves an Arrow body (scope key)


class JsonOnly:
    """Reject bodies of other types (415) and over the size limit (413) before parsing: JSON
    everywhere, an Arrow IPC stream on /predict_arrow. BentoML parses JSON only: the Arrow body
    is read here, left in the request's scope, and BentoML is handed `{}`."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            length = headers.get("content-length")
            arrow = scope.get("path") == ARROW_ROUTE
            expected = ARROW_STREAM if arrow else "application/json"
            if (content_type or arrow) and content_type != expected:
                await _answer(send, 415, f"content-type must be {expected}, found {content_type!r}")
                return
            if length and length.isdigit() and int(length) > self.max_bytes:
                await _answer(
                    send,
                    413,
                    f"request body of {length} bytes exceeds the limit of {self.max_bytes} bytes",
                )
                return
            if arrow:
                body = await _read_body(receive, self.max_bytes)
                if body is None:
                    await _answer(send, 413, f"request body exceeds {self.max_bytes} bytes")
                    return
                scope = {
                    **scope,
                    _ARROW_BODY: body,
                    "headers": [
                        (k, v)
                        for k, v in scope.get("headers", [])
                        if k.lower() not in (b"content-type", b"content-length")
                    ]
                    + [(b"content-type", b"application/json"), (b"content-length", b"2")],
                }
                receive = _replay(b"{}")
        elif scope["type"] == "http" and scope.get("path") == "/docs.json":
            await self.app(scope, receive, _documenting_arrow(send))
            return
        await self.app(scope, receive, send)


async def _read_body(receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _documenting_arrow(send):
    """`send` for /docs.json that documents /predict_arrow's Arrow bodies (BentoML knows only
    the JSON it parses)."""
    import json

    start: dict[str, Any] = {}

    async def wrapped(message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
            return
        if message["type"] == "http.response.body" and start:
            body = message.get("body", b"")
            try:
                document = json.loads(body)
                operation = document["paths"][ARROW_ROUTE]["post"]
            except (ValueError, KeyError):
                await send(start)
                await send(message)
                return
            operation["requestBody"] = {
                "required": True,
                "description": _ARROW_REQUEST,
                "content": {ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}}},
            }
            answer = operation.setdefault("responses", {}).setdefault("200", {})
            answer["description"] = _ARROW_RESPONSE
            answer["content"] = {ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}}}
            body = json.dumps(document).encode()
            headers = [
                (k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"
            ]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        await send(message)

    return wrapped


_ARROW_REQUEST = (
    "An Arrow IPC stream (one record batch or more) with one column per request field, named "
    "as in the Columns schema of /predict_columns; required fields present, optional ones may "
    "be left out. Column types: integer fields an Arrow integer type, number fields an integer "
    "or floating type (finite), text fields string, date-times a timestamp without time zone. "
    f"1 to {MAX_BATCH} rows."
)
_ARROW_RESPONSE = (
    "An Arrow IPC stream: request_id, model_version, prediction (binary: and label; "
    "multiclass: probability_<class> per class), one row per request row, in order."
)


async def _answer(send, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _dump(record: BaseModel) -> dict[str, Any]:
    return record.model_dump()


@bentoml.service(name="ml_lifecycle", traffic={"timeout": 60}, workers=WORKERS)
class Predictor:
    """Predictions from the champion model with the pipeline's own feature logic."""

    def __init__(self) -> None:
        self.runtime = RUNTIME

    # One record: CPU-bound and short, so `async` runs it on the event loop without the
    # thread-pool hand-off a sync API pays per request (~1-3 ms under load). Batches are sync:
    # in BentoML's thread pool two batches overlap where they release the GIL (LightGBM,
    # Polars, numpy), which the event loop would serialise.
    @bentoml.api(route="/predict")
    async def predict(self, record: Record, /) -> dict[str, Any]:  # type: ignore[valid-type]
        """Score one record (the fields known at request time); the answer names the model."""
        try:
            return self.runtime.score([_dump(record)])[0]
        except RequestError as error:
            raise InvalidArgument(str(error)) from None

    @bentoml.api(route="/predict_batch")
    def predict_batch(self, batch: Batch, /) -> dict[str, Any]:
        """Score many records at once (1 to ML_LIFECYCLE_MAX_BATCH)."""
        try:
            return {"predictions": self.runtime.score_fields(VALIDATOR.records(batch.records))}
        except RequestError as error:
            raise InvalidArgument(str(error)) from None

    @bentoml.api(route="/predict_columns")
    def predict_columns(self, batch: ColumnBatch, /) -> dict[str, Any]:
        """Score a batch sent as one list per field; answers {model_version, request_ids,
        predictions, labels|probabilities} as lists in the same order."""
        try:
            return self.runtime.score_columns(VALIDATOR.columns(batch.columns))
        except RequestError as error:
            raise InvalidArgument(str(error)) from None

    @bentoml.api(route=ARROW_ROUTE)
    def predict_arrow(self, ctx: bentoml.Context) -> bytes:
        """Score a batch sent as an Arrow IPC stream (content-type
        application/vnd.apache.arrow.stream), one column per field; answers an Arrow IPC
        stream (request_id, model_version, prediction, label|probability_<class>)."""
        body = ctx.request.scope.get(_ARROW_BODY)
        if body is None:
            raise InvalidArgument(f"send the batch as an Arrow IPC stream ({ARROW_STREAM})")
        try:
            table = pa.ipc.open_stream(body).read_all()
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as error:
            raise InvalidArgument(f"the body is not a readable Arrow IPC stream: {error}") from None
        try:
            answer = self.runtime.score_table(VALIDATOR.arrow(table))
        except RequestError as error:
            raise InvalidArgument(str(error)) from None
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, answer.schema) as writer:
            writer.write_table(answer)
        return Response(sink.getvalue().to_pybytes(), media_type=ARROW_STREAM)

    @bentoml.api(route="/events")
    def events(self, events: Events, /) -> dict[str, Any]:
        """Rows whose outcomes are now known: they update the history aggregates online."""
        try:
            return {"added": self.runtime.ingest_events([_dump(e) for e in events.events])}
        except RequestError as error:
            raise InvalidArgument(str(error)) from None

    @bentoml.api(route="/labels")
    def labels(self, labels: Labels, /) -> dict[str, Any]:
        """Ground truth for earlier predictions, joined later by request_id."""
        return {
            "recorded": self.runtime.record_labels([label.model_dump() for label in labels.labels])
        }

    @bentoml.api(route="/model")
    def model(self) -> dict[str, Any]:
        """The dataset, model version (and shadow), snapshot and request schema being served."""
        self.runtime.reload_if_changed()
        return self.runtime.describe()


Predictor.add_asgi_middleware(JsonOnly)


def _json_media_types_fixed(service: Any) -> None:
    """BentoML works out a response's media type from the output model's JSON schema, which
    pydantic builds again for every response: about 8% of a single-row request's CPU (py-spy,
    /predict at one connection). Each JSON route's type is fixed here, once, to what that
    gives (application/json), as BentoML itself does for streaming routes."""
    for method in service.apis.values():
        spec = method.output_spec
        if spec.media_type is None and spec.mime_type() == "application/json":
            spec.media_type = "application/json"


_json_media_types_fixed(Predictor)
# The runtime's start-up objects (reference indexes, online-store keys) live as long as the
# worker: frozen, the collector's full passes stop walking them between requests.
gc.freeze()
