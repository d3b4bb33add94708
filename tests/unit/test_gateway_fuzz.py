"""The gateway answers every input in OpenAI's error envelope, never with a 500: Hypothesis sends it arbitrary JSON
bodies, multipart forms, raw bytes, methods and paths, in process over a stand-in pipeline that also encodes each
request it is given with the real codec, as publishing does."""

import asyncio
import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pixelpipe.core.codec import Codec
from pixelpipe.gateway.params import EDIT_PARAMS, GENERATION_PARAMS
from pixelpipe.gateway.pipeline import image_request
from tests.unit.test_gateway_http import StandInPipeline, gateway_client

MIN_CALLS = 10_000
GENERATIONS, EDITS = "/v1/images/generations", "/v1/images/edits"
PATHS = [GENERATIONS, EDITS, "/v1/models", "/healthz", "/v1/files/a/b.png", "/", "/v1", "/v1/images"]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
KNOWN_PARAMS = sorted(GENERATION_PARAMS | EDIT_PARAMS)
# Text that trips careless parsers: NaN-like and number-like words, digits int() refuses though str.isdigit()
# accepts them, more digits than int() converts, lone surrogates, invisible and control characters.
TRICKY_TEXT = [
    "", " ", "NaN", "nan", "Infinity", "-Infinity", "1e999", "-0", "0x10", "1_000", " 4 ", "--5", "+5", "²", "٣",
    "9" * 5000, "\ud800", "a\udfffb", "\udbff\udfff", "\x00", "\u200b", "\u202e", "\ufeff", "64x64", "²x64",
    "8x" + "9" * 5000, "2048x2048", "auto", "true", "True", "null", "tiny-sd", "tiny-klein", "url", "b64_json",
]  # fmt: skip


class EncodingPipeline(StandInPipeline):
    """The stand-in pipeline, which first encodes the ImageRequest of each submission with the real codec: text the
    codec cannot write fails here as it would on its way to the broker."""

    codec = Codec()

    async def submit(self, submission):
        self.codec.encode(image_request(submission, self.reply_topic, 60.0))
        return await super().submit(submission)


@dataclass
class Call:
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def sample_images() -> list[bytes]:
    """Small valid uploads in every mode each format saves, some with sides under the models' multiple of 8."""
    images = []
    for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "CMYK"):
        for image_format in ("PNG", "JPEG", "WEBP"):
            for size in ((64, 64), (5, 3), (64, 8), (17, 64)):
                out = io.BytesIO()
                try:
                    Image.new(mode, size).save(out, format=image_format)
                except OSError:  # a mode this format cannot hold
                    continue
                images.append(out.getvalue())
    return images


SAMPLE_IMAGES = sample_images()


@st.composite
def weighted(draw: st.DrawFn, *choices: tuple[int, st.SearchStrategy]) -> object:
    """A value of one of the strategies, each drawn from in proportion to its weight."""
    pick = draw(st.integers(0, sum(weight for weight, _ in choices) - 1))
    for weight, strategy in choices:
        if pick < weight:
            return draw(strategy)
        pick -= weight
    raise AssertionError("the pick is below the total weight")


text = st.one_of(
    st.sampled_from(TRICKY_TEXT),
    st.text(st.characters(), max_size=16),
    st.builds("{}{}{}".format, st.text(max_size=4), st.characters(categories=["Cs"]), st.text(max_size=4)),
    st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=4),  # digits, some that int() refuses
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),  # NaN and infinities too, written as json.dumps writes them
    text,
)
# Two levels of nesting at most (st.recursive costs twice the time): the deep ones are deeply_nested's.
json_containers = st.lists(json_scalars, max_size=3) | st.dictionaries(text, json_scalars, max_size=3)
json_values = json_scalars | json_containers | st.lists(json_containers, max_size=2)
plausible = {
    "prompt": text | st.just("x" * 40_000),
    "model": st.sampled_from(["tiny-sd", "tiny-klein", "other", "missing"]),
    "n": st.integers(-1, 12),
    "size": st.sampled_from(["64x64", "auto", "7x7", "8x2048", "4096x64", "0x0", "64X64"]),
    "quality": st.sampled_from(["auto", "low", "medium", "high", "standard", "hd", "ultra"]),
    "response_format": st.sampled_from(["b64_json", "url", "png"]),
    "output_format": st.sampled_from(["png", "jpeg", "webp", "gif"]),
    "output_compression": st.integers(-5, 105),
    "background": st.sampled_from(["auto", "opaque", "transparent"]),
    "moderation": st.sampled_from(["auto", "low"]),
    "user": text | st.just("u" * 64),
    "stream": st.booleans(),
    "partial_images": st.integers(-1, 4),
    "input_fidelity": st.sampled_from(["low", "high", "max"]),
}
# Each known parameter: mostly a plausible value (to reach the checks behind it), else any JSON value (a wrong type).
param_values = {
    name: weighted((2, plausible[name]), (1, json_values)) if name in plausible else json_values
    for name in KNOWN_PARAMS
}
# A call whose parameters pass every check but one or two reaches the checks behind them, and the pipeline.
one_param = st.one_of([values.map(lambda value, name=name: {name: value}) for name, values in param_values.items()])
odd_params = st.builds(lambda first, second: first | second, one_param, st.just({}) | one_param)
# Calls that pass: a plain one, a stream, several images answered by URL.
valid_params = st.sampled_from(
    [
        {"prompt": "a fox", "size": "64x64"},
        {"prompt": "a fox", "size": "64x64", "stream": True, "partial_images": 1},
        {"prompt": "a fox", "size": "64x64", "n": 2, "output_format": "webp", "response_format": "url"},
    ]
)
json_params = weighted(
    (4, st.builds(lambda valid, odd: valid | odd, valid_params, odd_params)),
    (1, st.fixed_dictionaries({}, optional=param_values)),
    (1, st.dictionaries(st.sampled_from(KNOWN_PARAMS) | text, json_values, max_size=5)),
)


def nested(depth: int, brackets: tuple[str, str], innermost: str, template: str) -> bytes:
    opener, closer = brackets
    return template.format(opener * depth + innermost + closer * depth).encode()


# Arrays and objects nested from a few to thousands deep, alone or as a parameter's value.
deeply_nested = st.builds(
    nested,
    st.integers(1, 3000),
    st.sampled_from([("[", "]"), ('{"a":', "}"), ('[{"a":', "}]")]),
    st.sampled_from(["1", '"x"', "[]", "{}"]),
    st.sampled_from(["{}", '{{"prompt": {}}}', '{{"prompt": "a fox", "n": {}}}']),
)


def json_body(value: object, ascii_only: bool) -> bytes:
    """``value`` as JSON text; unescaped lone surrogates become bytes that are not UTF-8 (CESU-8)."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


json_bodies = weighted(
    (6, st.builds(json_body, json_params, st.booleans())),
    (1, st.builds(json_body, json_values, st.booleans())),
    (1, deeply_nested),
    (1, st.binary(max_size=200)),
    (1, st.builds(lambda junk: b'{"prompt": "a ' + junk + b' fox"}', st.binary(min_size=1, max_size=8))),
)
json_content_types = st.sampled_from(["application/json", "application/json; charset=latin-1", "text/plain", ""])


def corrupt(image: bytes, offsets: list[int], cut: int | None) -> bytes:
    """``image`` with a byte flipped at each offset (taken modulo its length) and cut short at ``cut``."""
    data = bytearray(image)
    for offset in offsets:
        data[offset % len(data)] ^= 0xFF
    return bytes(data[:cut])


valid_uploads = st.sampled_from(SAMPLE_IMAGES)
upload_bytes = st.one_of(
    valid_uploads,
    st.builds(
        corrupt,
        valid_uploads,
        st.lists(st.integers(0, 10_000), max_size=3),
        st.none() | st.integers(0, 400),
    ),
    st.binary(max_size=64),
    st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"\xff\xd8\xff\xe0", b"GIF89a"]),
)


def field_text(values: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """A text field's bytes: one of ``values`` as a form writes it, odd text, or bytes that are not UTF-8."""
    written = values.map(lambda value: str(value).lower() if isinstance(value, bool) else str(value))
    return weighted(
        (3, (written | text).map(lambda value: value.encode("utf-8", "surrogatepass"))),
        (1, st.binary(max_size=30)),  # mostly not UTF-8
        (1, st.sampled_from([b"\xff", b"a\xc3", b"\xed\xa0\x80", b"\xc0\xaf"])),
    )


FIELD_TEXT = {name.encode(): field_text(plausible.get(name, st.nothing())) for name in KNOWN_PARAMS}
ODD_FIELD_TEXT = field_text(st.nothing())
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16)
Part = tuple[bytes, bytes | None, bytes | None, bytes]  # name, filename (a file part), content type, data
valid_edit_fields = st.sampled_from(
    [
        [(b"prompt", None, None, b"a hat")],
        [(b"prompt", None, None, b"a hat"), (b"stream", None, None, b"true")],
        [(b"prompt", None, None, b"a hat"), (b"model", None, None, b"tiny-klein"), (b"n", None, None, b"2")],
    ]
)
part_names = st.sampled_from([*KNOWN_PARAMS, "image[]", "file"]).map(str.encode) | st.binary(max_size=10)
filenames = st.sampled_from([b"a.png", b"", b'"q".png', b"\xff.png", b"../../x"])
file_content_types = st.sampled_from([b"image/png", b"image/jpeg", b"text/plain", b"\xff/\xfe", b""])


@st.composite
def form_parts(draw: st.DrawFn) -> list[Part]:
    """Mostly an edit that would pass (an image and a prompt) with a few odd parts: images and masks as files, the
    rest as text fields, now and then a text field sent as a file or a file as a text field."""
    parts: list[Part] = []
    if draw(st.integers(0, 3)):
        parts += [(b"image", b"a.png", b"image/png", draw(valid_uploads)), *draw(valid_edit_fields)]
    for _ in range(draw(st.integers(0, 4))):
        name = draw(part_names)
        as_file = draw(st.booleans()) if draw(st.integers(0, 9)) == 0 else name in (b"image", b"image[]", b"mask")
        if as_file:
            parts.append((name, draw(filenames), draw(file_content_types), draw(upload_bytes)))
        else:
            parts.append((name, None, None, draw(FIELD_TEXT.get(name, ODD_FIELD_TEXT))))
    return parts


def multipart(parts: list[Part], boundary: bytes) -> bytes:
    out = []
    for name, filename, content_type, data in parts:
        disposition = b'Content-Disposition: form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        headers = [disposition] + ([b"Content-Type: " + content_type] if content_type else [])
        out.append(b"--" + boundary + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + data + b"\r\n")
    return b"".join(out) + b"--" + boundary + b"--\r\n"


form_content_types = weighted(
    (6, st.just("multipart/form-data; boundary=fuzzboundary")),
    (
        1,
        st.sampled_from(
            [
                "multipart/form-data; charset=latin-1; boundary=fuzzboundary",
                "multipart/form-data",
                "multipart/form-data; boundary=other",
                "application/x-www-form-urlencoded",
                "application/json",
            ]
        ),
    ),
)


edit_calls = st.builds(
    lambda body, content_type: Call("POST", EDITS, body, {"content-type": content_type}),
    weighted((6, st.builds(multipart, form_parts(), st.just(b"fuzzboundary"))), (1, st.binary(max_size=200))),
    form_content_types,
)
generation_calls = st.builds(
    lambda body, headers: Call("POST", GENERATIONS, body, headers),
    json_bodies,
    st.fixed_dictionaries(
        {"content-type": json_content_types}, optional={"idempotency-key": header_text | st.just("k" * 300)}
    ),
)
# Any method on the known paths and on made-up ones, with any body.
routed_calls = st.builds(
    lambda method, path, body: Call(method, path, body),
    st.sampled_from(METHODS),
    st.sampled_from(PATHS) | st.builds("/{}".format, header_text),
    st.binary(max_size=40),
)
# Now and then unauthenticated or with a key that is not one, or with an odd Host.
odd_headers = st.fixed_dictionaries(
    {},
    optional={
        "authorization": st.sampled_from(["", "Bearer", "Basic abc", "Bearer pp-k1-x"]),
        "host": st.sampled_from(["[", "a b", "x:99999999", "", "example.com:-1", "[::1"]),
    },
)


@st.composite
def calls(draw: st.DrawFn) -> Call:
    call = draw(st.one_of(generation_calls, edit_calls, routed_calls))
    if draw(st.integers(0, 9)) == 0:
        call.headers |= draw(odd_headers)
    return call


def check_envelope(body: object) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    # Messages speak of the call, never of the gateway's insides.
    assert not any(leak in error["message"] for leak in ("Traceback", "Error(", "Exception(", "codec")), error


def check_answer(call: Call, answer: httpx.Response, key_id: str) -> None:
    assert answer.status_code < 500, (call, answer.status_code, answer.text[:500])
    if call.method == "HEAD":  # answered without a body
        return
    if answer.status_code >= 400:
        check_envelope(answer.json())
    elif answer.headers["content-type"].startswith("text/event-stream"):  # its last event: the image, or an error
        last = json.loads(answer.text.strip().rpartition("\n\n")[2].partition("data: ")[2])
        if last["type"] == "error":
            check_envelope({"error": last["error"]})
        else:
            assert last["type"].endswith(".completed") and last["b64_json"], last["type"]
    elif call.path in (GENERATIONS, EDITS):
        assert answer.json()["data"], answer.text[:500]
    authenticated_route = (call.method, call.path) in {("POST", GENERATIONS), ("POST", EDITS), ("GET", "/v1/models")}
    if authenticated_route and "authorization" not in call.headers:
        assert answer.headers["x-request-id"].startswith(f"{key_id}-"), (call, answer.status_code)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """Sends a call to the gateway's app in process, on one event loop (a TestClient starts a thread for every call,
    four times the cost), with a key no rate limit stops; and that key's id."""
    client, _, entry = gateway_client(
        tmp_path_factory.mktemp("gateway"), EncodingPipeline, requests_per_minute=10**9, burst=10**9
    )
    loop = asyncio.new_event_loop()
    transport = httpx.ASGITransport(app=client.app)  # the app's exceptions are raised here, as a TestClient's are
    caller = httpx.AsyncClient(transport=transport, headers=client.headers)

    def send(call: Call) -> httpx.Response:
        url = f"http://testserver{call.path}"  # whole: a path such as '//x' is no host here
        return loop.run_until_complete(caller.request(call.method, url, content=call.body, headers=call.headers))

    yield send, entry.key_id
    loop.run_until_complete(caller.aclose())
    loop.close()


def test_no_input_gets_a_500_and_every_refusal_is_an_envelope(gateway):
    send, key_id = gateway
    codes: Counter[tuple[str, int]] = Counter()

    @settings(
        max_examples=MIN_CALLS,
        deadline=None,
        derandomize=True,  # the same calls on every run, in CI too
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(calls())
    def answered(call: Call) -> None:
        answer = send(call)
        check_answer(call, answer, key_id)
        codes[call.path if call.path in PATHS else "other", answer.status_code] += 1

    started_s = time.perf_counter()
    answered()
    elapsed_s = time.perf_counter() - started_s
    assert sum(codes.values()) >= MIN_CALLS, codes
    # The calls reached every check, not only the first: images were made, and each kind of refusal was given.
    assert {200, 400, 401, 404, 405} <= {code for _, code in codes}, codes
    assert codes[GENERATIONS, 200] and codes[EDITS, 200] and codes["other", 404], codes
    print(f"{sum(codes.values())} fuzzed calls in {elapsed_s:.1f} s: {sorted(codes.items())}")
