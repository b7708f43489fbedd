"""The multipart form of a request, parsed by the service itself: {field name: [parts in order]}.

Requests are parsed here rather than by BentoML's form handling, which in 1.4 downloads a URL
given in place of a file, answers 500 for non-UTF-8 text fields or odd file names, and returns
list-shaped error bodies.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import RequestError


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # None for a text field
    data: bytes


def parse_form(body: bytes, content_type: str, max_parts: int, file_field: str, expected: str) -> dict[str, list[Part]]:
    """A multipart/form-data body as {field name: [parts in order]}; `file_field` names the image field and
    `expected` what the form may hold, for the messages."""
    if not body:
        raise RequestError(
            400, "missing_field", f"the request body is empty: send a multipart form with an `{file_field}` file field"
        )
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        shown = kind.decode("latin-1") or "none"
        raise RequestError(
            415,
            "bad_request",
            f"the request content type is {shown}; send multipart/form-data (curl -F image=@photo.png URL)",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "bad_request", "the multipart content type has no boundary parameter")

    parts: list[Part] = []
    headers: dict[bytes, bytes] = {}
    field_name = bytearray()
    field_value = bytearray()
    chunks: list[bytes] = []

    def on_part_begin() -> None:
        headers.clear()
        chunks.clear()
        if len(parts) >= max_parts:
            raise RequestError(413, "too_large", f"the form has more than {max_parts} parts; send {expected}")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        field_value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(field_name).lower()] = bytes(field_value)
        field_name.clear()
        field_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        disposition, options = parse_options_header(headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise RequestError(400, "bad_request", "a form part has no Content-Disposition: form-data; name=...")
        name = options[b"name"].decode("latin-1")
        filename = options[b"filename"].decode("latin-1") if b"filename" in options else None
        parts.append(Part(name, filename, b"".join(chunks)))

    ended: list[bool] = []

    def on_end() -> None:  # the closing boundary (python-multipart's finalize does not check it)
        ended.append(True)

    callbacks = {
        "on_end": on_end,
        "on_part_begin": on_part_begin,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise RequestError(400, "bad_request", f"the multipart form is malformed ({exc})") from None
    if not ended:
        raise RequestError(
            400,
            "bad_request",
            "the multipart form ends before its closing boundary: the body is cut short or malformed",
        )
    form: dict[str, list[Part]] = {}
    for part in parts:
        form.setdefault(part.name, []).append(part)
    return form
