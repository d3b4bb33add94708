"""Request bodies, read strictly before anything parses deeper or encodes them.

A JSON body must be UTF-8, nest arrays and objects at most ``MAX_JSON_DEPTH`` deep (counted on the text, so no
parser recurses into a deeper one), and hold only JSON's own values (no NaN or Infinity, no number of thousands of
digits); every string in it, names included, must be valid Unicode: JSON's escapes can spell a lone surrogate
(``"\\ud800"``) that no UTF-8 encoder, the Avro codec's included, can write. A multipart form must be UTF-8, each
of its text fields too (Starlette would read one that is not as Latin-1). Each refusal is a 400 naming the
parameter where there is one.
"""

from __future__ import annotations

import contextlib
import json
import re
from itertools import accumulate
from typing import Any, NoReturn

from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from pixelpipe.gateway.errors import invalid

MAX_BODY_BYTES = 1 << 20  # a JSON body: a prompt and a few options
MAX_JSON_DEPTH = 64  # a call's parameters nest one deep; the limit leaves room and refuses only abuse
MAX_NUMBER_DIGITS = 100  # no parameter needs more; int() refuses over 4300 with an error of its own
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]")
_NESTING = {"[": 1, "{": 1, "]": -1, "}": -1}
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_HINT = "it holds a lone surrogate (\\ud800 to \\udfff), which is not a character"


def read_json_object(body: bytes) -> dict[str, Any]:
    """The JSON object of a call's body, its strings all valid Unicode; ApiError 400."""
    if len(body) > MAX_BODY_BYTES:
        raise invalid(None, f"The request body is over {MAX_BODY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(None, f"The body must be UTF-8 JSON; byte {e.start} is not UTF-8") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise invalid(None, f"The body nests arrays and objects more than {MAX_JSON_DEPTH} deep")
    try:
        params = json.loads(text or "null", parse_constant=_not_json, parse_int=_integer)
    except json.JSONDecodeError as e:
        raise invalid(None, f"The body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(params, dict):
        raise invalid(None, "The body must be a JSON object (Content-Type: application/json)")
    check_unicode(params)
    return params


def json_depth(text: str) -> int:
    """How deep the arrays and objects of a JSON text nest, counting the brackets outside its strings (in C: a
    Python loop takes 0.2 s over a 1 MiB body of brackets)."""
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    return max(accumulate(map(_NESTING.__getitem__, brackets)), default=0)


def _not_json(constant: str) -> NoReturn:
    raise invalid(None, f"The body is not valid JSON: {constant} is not a JSON value")


def _integer(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise invalid(None, f"The body holds a number of over {MAX_NUMBER_DIGITS} digits")
    return int(digits)


def check_unicode(params: dict[str, Any]) -> None:
    """A 400 naming the parameter that holds a lone surrogate anywhere in its value (or in its name)."""
    for name, value in params.items():
        if _SURROGATE.search(name):
            raise invalid(None, f"A parameter's name is not valid Unicode: {_SURROGATE_HINT}")
        if not _valid_unicode(value):
            raise invalid(name, f"'{name}' is not valid Unicode: {_SURROGATE_HINT}")


def _valid_unicode(value: Any) -> bool:
    """Recurses at most MAX_JSON_DEPTH deep: the body's depth was checked first."""
    if isinstance(value, str):
        return _SURROGATE.search(value) is None
    if isinstance(value, list):
        return all(map(_valid_unicode, value))
    if isinstance(value, dict):
        return all(_valid_unicode(key) and _valid_unicode(item) for key, item in value.items())
    return True


class _Utf8MultiPartParser(MultiPartParser):
    """Starlette's multipart parser, which refuses a text field that is not UTF-8 where Starlette would read it as
    Latin-1 (its ``_current_part`` holds the field's bytes until they are decoded)."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                part.data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise invalid(part.field_name, f"'{part.field_name}' is not UTF-8 text (byte {e.start})") from None
        super().on_part_end()


async def read_form(request: Request, max_files: int, max_fields: int) -> FormData:
    """A multipart/form-data body whose text fields are UTF-8 (so valid Unicode); close it after use."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise invalid(None, "The body must be multipart/form-data")
    if options.get(b"charset", b"utf-8").lower() not in (b"utf-8", b"utf8"):
        raise invalid(None, "A multipart/form-data body must be UTF-8 (charset=utf-8, or no charset)")
    try:
        async with contextlib.aclosing(request.stream()) as stream:
            parser = _Utf8MultiPartParser(request.headers, stream, max_files=max_files, max_fields=max_fields)
            return await parser.parse()
    except MultiPartException as e:
        raise invalid(None, f"The body must be multipart/form-data: {e.message}") from None
