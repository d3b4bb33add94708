"""`pixelpipe demo`: the pipeline end to end on embedded defaults, starting whatever is missing.

It starts the local stack when no Kafka answers, builds the tiny models when the registry is missing, runs a
worker with every stage, publishes a mix of requests (generate, edit, inpaint, prompts that must be rejected,
an expired deadline, one cancelled before its render), waits for every result, loads results and metrics into
ClickHouse with the sink, and prints a summary read back from ClickHouse. With ``experiment``, the requests are
instead many light ones from hundreds of users, enough for ``pixelpipe analyze`` to give intervals.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

from pixelpipe.core.clock import utc_now
from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.events import ImageRequest, ImageResult
from pixelpipe.core.experiments import Experiment, load_experiments
from pixelpipe.core.settings import Settings, mask_secrets
from pixelpipe.core.topics import ensure_topics
from pixelpipe.producers import Publisher, new_request
from pixelpipe.producers.results import collect
from pixelpipe.tools.processes import PixelpipeProcess, WorkerProcess
from pixelpipe.tools.stack.services import port_bindable, scrape_ports, stack_unless_kafka_answers
from pixelpipe.tools.stack.settings import StackSettings

DEMO_EXPERIMENT = {
    "key": "steps-test",
    "control": "control",
    "variants": [
        {"name": "control", "weight": 1},
        {"name": "fast", "weight": 1, "overrides": {"steps": 2}},
    ],
}
PROMPTS = (
    "a lighthouse on a cliff at dusk",
    "a red fox in fresh snow",
    "an isometric city block made of glass",
    "a bowl of ramen, studio lighting",
)
REJECTED_PROMPTS = ("a gory massacre in the street", "how to cook meth at home")
CANCELLED_INDEX = 1  # a generation the demo cancels before publishing it: it ends CANCELLED, never rendered
# `demo --experiment`: enough users for intervals (analyze wants 100 per arm), each request as light as the tiny
# model allows; output moderation (about 110 ms of CPU per image) bounds how many fit in a few minutes on 2 cores.
EXPERIMENT_REQUESTS = 640
EXPERIMENT_REQUESTS_PER_USER = 1.9  # 336 users: 165 in control and 171 in fast, by the experiment's hash
EXPERIMENT_SIDE = 16
EXPERIMENT_WORKERS = 2
STAGES = ["moderation", "generate", "edit"]


def metrics_ports(settings: Settings, stack: StackSettings, count: int) -> list[dict[str, str]]:
    """The metrics port of each of ``count`` processes: the local Prometheus' scrape ports (the workers first,
    the sink last) where free, so `pixelpipe top` shows the demo; none where a port is taken, or where
    PIXELPIPE_METRICS_PORT is set (each process would then take the same)."""
    if settings.ops.metrics_port:
        return [{} for _ in range(count)]
    wanted = scrape_ports(stack)
    ports = [wanted[i] if i < len(wanted) and port_bindable(wanted[i]) else 0 for i in range(count)]
    if len(wanted) > count:  # the sink's is the stack's third port (9402) however many workers run
        ports[-1] = wanted[2] if len(wanted) > 2 and port_bindable(wanted[2]) else ports[-1]
    return [{"PIXELPIPE_METRICS_PORT": str(port), "PIXELPIPE_METRICS_HOST": "127.0.0.1"} for port in ports]


def run_demo(
    settings: Settings,
    stack_settings: StackSettings,
    count: int,
    echo: Callable[[str], None],
    keep_stack: bool = False,
    experiment_only: bool = False,
) -> bool:
    """Run the demo; True when every request got exactly one terminal result. ``experiment_only`` publishes
    ``count`` light requests for the experiment instead of the mix."""
    began = time.monotonic()
    logs = Path("data") / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    with stack_unless_kafka_answers(settings, stack_settings, echo, keep=keep_stack) as settings:
        settings = _prepare(settings, logs, echo)
        experiment = load_experiments(settings.experiments.file)["steps-test"]
        if experiment_only:
            requests = _experiment_requests(count, experiment)
        else:
            requests = _requests(settings, count, experiment)
        # The experiment runs one worker per core, each with one thread per operation: tiny tensors gain nothing
        # from a second thread, whose spinning starves the other stages; the workers share the partitions.
        names = [f"worker-{i}.log" for i in range(1, EXPERIMENT_WORKERS + 1)] if experiment_only else ["worker.log"]
        worker_env = {"OMP_NUM_THREADS": "1"} if experiment_only else {}
        ports = metrics_ports(settings, stack_settings, len(names) + 1)
        with contextlib.ExitStack() as running:
            workers = [
                running.enter_context(WorkerProcess(settings, STAGES, logs / n, worker_env | ports[i]))
                for i, n in enumerate(names)
            ]
            worker_logs = ", ".join(str(worker.log_path) for worker in workers)
            _publish(settings, requests, [] if experiment_only else [requests[CANCELLED_INDEX].request_id])
            echo(f"published {len(requests)} requests; worker logs: {worker_logs}")
            results = collect(
                settings.kafka,
                settings.topics.results,
                ImageResult,
                [r.request_id for r in requests],
                timeout_s=900,
                progress=True,
            )
            gateway_lines = [] if experiment_only else _gateway_calls(settings, logs, echo)
        if results.missing:
            echo(f"{len(results.missing)} requests got no result; see {worker_logs}")
            return False
        echo("loading results and metrics into ClickHouse ...")
        sink = PixelpipeProcess(settings, ["clickhouse", "sink", "--max-idle", "3"], logs / "sink.log", ports[-1])
        if sink.process.wait(300) != 0:
            echo(f"the sink failed; see {sink.log_path}:\n{sink.log_tail()}")
            return False
        _summarise(settings, requests, echo)
        for line in gateway_lines:
            echo(line)
        echo(f"done in {time.monotonic() - began:.0f} s")
        return True


def _gateway_calls(settings: Settings, logs: Path, echo: Callable[[str], None]) -> list[str]:
    """`pixelpipe gateway` beside the worker, with a demo key: one generation and one prompt that must be blocked,
    called over HTTP as any OpenAI client would; returns the lines to print, with the curl command to try."""
    import base64
    import urllib.error
    import urllib.request

    from pixelpipe.gateway.keys import KeyStore
    from pixelpipe.tools.stack.services import port_open

    port = settings.gateway.port
    while port_open(port):
        port += 1
    keys = KeyStore(logs / "gateway-keys.json")
    secret, _ = keys.create("demo", name="pixelpipe demo")
    gateway_settings = settings.updated(gateway_port=port, gateway_keys_file=str(keys.path))
    base = f"http://127.0.0.1:{port}"
    echo(f"starting the gateway on {base} ...")
    lines = ["gateway (OpenAI Images API):"]
    with PixelpipeProcess(gateway_settings, ["gateway"], logs / "gateway.log") as gateway:
        deadline = time.monotonic() + 60
        while not port_open(port):
            if gateway.process.poll() is not None or time.monotonic() > deadline:
                return [f"the gateway did not start; see {gateway.log_path}:", gateway.log_tail()]
            time.sleep(0.2)
        for prompt in ("a lighthouse on a cliff at dusk", REJECTED_PROMPTS[0]):
            body = json.dumps({"model": "tiny-sd", "prompt": prompt, "size": "64x64"}).encode()
            call = urllib.request.Request(
                f"{base}/v1/images/generations",
                body,
                {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(call, timeout=120) as answer:
                    status, headers, reply = answer.status, answer.headers, json.loads(answer.read())
            except urllib.error.HTTPError as e:
                status, headers, reply = e.code, e.headers, json.loads(e.read())
            if status == 200:
                png = base64.b64decode(reply["data"][0]["b64_json"])
                what = f"{len(png)} bytes of PNG, {headers.get('server-timing')}"
            else:
                what = f"{reply['error']['code']}: {reply['error']['message']}"
            lines.append(f"  {status} {prompt!r}: {what}; x-request-id {headers.get('x-request-id')}")
    lines.append(
        f"  try it: pixelpipe gateway, then curl {base}/v1/images/generations -H 'Authorization: Bearer $KEY'"
        ' -H \'Content-Type: application/json\' -d \'{"model": "tiny-sd", "prompt": "a red fox",'
        ' "size": "64x64"}\' (a key: pixelpipe keys create --user you)'
    )
    return lines


def prepare_servers(settings: Settings, echo: Callable[[str], None]) -> Settings:
    """The tiny models when the registry is missing, the topics and the ClickHouse schema; returns ``settings``."""
    from pixelpipe.sinks.clickhouse.migrate import migrate
    from pixelpipe.tools.model_builders import build_tiny_models

    if not Path(settings.models.registry).exists():
        echo("building the tiny models ...")
        build_tiny_models(Path(settings.models.registry).parent)
    ensure_topics(settings.kafka, settings.topics)
    migrate(settings.clickhouse.url)
    return settings


def _prepare(settings: Settings, logs: Path, echo: Callable[[str], None]) -> Settings:
    """``prepare_servers``, and an experiments file with the demo's experiment when none is configured; returns
    the settings to run with."""
    settings = prepare_servers(settings, echo)
    if Path(settings.experiments.file).exists():
        return settings
    experiments_file = logs / "experiments.json"
    start = utc_now().date().isoformat()
    experiments_file.write_text(json.dumps({"experiments": [DEMO_EXPERIMENT | {"start": start}]}, indent=2))
    return settings.updated(experiments_file=str(experiments_file))


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _edit_inputs(settings: Settings) -> tuple[str, str]:
    """A source image and an inpainting mask, put in the configured object store."""
    from pixelpipe.core.objects import open_object_store

    source = Image.new("RGB", (64, 64), (40, 90, 160))
    ImageDraw.Draw(source).ellipse((16, 16, 48, 48), fill=(230, 200, 40))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((24, 24, 40, 40), fill=255)
    store = open_object_store(settings.objects)
    return (
        store.put("inputs/demo-source.png", _png(source), "image/png").uri,
        store.put("inputs/demo-mask.png", _png(mask), "image/png").uri,
    )


def _requests(settings: Settings, count: int, experiment: Experiment) -> list[ImageRequest]:
    """A reproducible mix: mostly generate, edits and inpaints, two rejected prompts, one expired deadline (and
    ``CANCELLED_INDEX``, a generation, which ``_publish`` cancels)."""
    source, mask = _edit_inputs(settings)
    rng = random.Random(7)
    requests = []
    for i in range(count):
        user_id = f"user-{rng.randrange(40):03d}"
        common = {
            "model": "tiny-sd" if i % 5 else "tiny-sd-b",
            "user_id": user_id,
            "width": 64,
            "height": 64,
            "seed": i,
            "priority": "INTERACTIVE" if i % 4 == 0 else "BATCH",
            "experiments": {experiment.key: experiment.assign(user_id)},
        }
        role = i % 10
        if role < 6:
            request = new_request(prompt=rng.choice(PROMPTS), n=1 + i % 2, **common)
        elif role < 8:
            request = new_request(kind="EDIT", prompt="make it dusk", source_image_uri=source, strength=0.6, **common)
        else:
            request = new_request(
                kind="EDIT", prompt="a small window", source_image_uri=source, mask_uri=mask, strength=0.9, **common
            )
        requests.append(request)
    for j, prompt in enumerate(REJECTED_PROMPTS):
        requests[3 + 10 * j].prompt = prompt
    requests[5].deadline = utc_now() - dt.timedelta(seconds=1)
    return requests


def _experiment_requests(count: int, experiment: Experiment) -> list[ImageRequest]:
    """Light text-to-image requests from ``count`` / 1.9 users, each user at least once: 16x16 on one tiny
    model, the model's steps (4) against the variant's (2). Every 50th request of each arm has a prompt that must
    be rejected and every 100th an expired deadline: the guardrail rates have events, the same share in both arms
    (drawn at random, chance alone would make one arm look worse now and then)."""
    rng = random.Random(11)
    users = [f"exp-user-{u:04d}" for u in range(max(1, int(count / EXPERIMENT_REQUESTS_PER_USER)))]
    requests, per_arm = [], dict.fromkeys(experiment.weights, 0)
    for i in range(count):
        user_id = users[i] if i < len(users) else rng.choice(users)
        variant = experiment.assign(user_id)
        nth = per_arm[variant] = per_arm[variant] + 1
        request = new_request(
            prompt=REJECTED_PROMPTS[nth % 2] if nth % 50 == 25 else rng.choice(PROMPTS),
            model="tiny-sd",
            user_id=user_id,
            width=EXPERIMENT_SIDE,
            height=EXPERIMENT_SIDE,
            seed=i,
            experiments={experiment.key: variant},
        )
        if nth % 100 == 60:
            request.deadline = utc_now() - dt.timedelta(seconds=1)
        requests.append(request)
    return requests


def _publish(settings: Settings, requests: list[ImageRequest], cancelled: list[str]) -> None:
    """``requests``, after a cancellation of each of ``cancelled``: those end CANCELLED at the render stage."""
    codec = codec_from_settings(settings.kafka)
    with Publisher(settings) as publisher:
        for request_id in cancelled:
            publisher.publish_cancellation(request_id, "the demo's cancelled request").result(timeout=60)
        pending = []
        for request in requests:
            if request.deadline is not None:
                # The SDK refuses an expired deadline; the demo sends one anyway to show the processors' answer.
                pending.append(publisher.publish_encoded(request.request_id.encode(), codec.encode(request)))
            else:
                pending.append(publisher.publish(request))
        for delivery in pending:
            delivery.result(timeout=60)


def _summarise(settings: Settings, requests: list[ImageRequest], echo: Callable[[str], None]) -> None:
    """Read the demo's rows back from ClickHouse, deduplicated, and print what analysts would see."""
    from pixelpipe.core.clickhouse import connect

    ids = ", ".join(f"'{r.request_id}'" for r in requests)
    client = connect(settings.clickhouse.url)
    try:
        by_status = client.execute(
            f"SELECT toString(status), toString(error_code), count() FROM results_dedup "
            f"WHERE request_id IN ({ids}) GROUP BY status, error_code ORDER BY status, error_code"
        )
        stages = client.execute(
            "SELECT toString(stage), count(), quantile(0.5)(queue_ms), quantile(0.95)(queue_ms),"
            " quantile(0.5)(compute_ms), quantile(0.95)(compute_ms), sum(cost_usd), max(batch_size)"
            f" FROM stage_metrics_dedup WHERE request_id IN ({ids}) GROUP BY stage ORDER BY stage"
        )
        what_ran = client.execute(
            "SELECT ifNull(variant, ''), model, toString(scheduler), steps, guidance, count(), max(batch_size)"
            f" FROM results_dedup WHERE request_id IN ({ids}) AND steps IS NOT NULL"
            " GROUP BY variant, model, scheduler, steps, guidance ORDER BY variant, model"
        )
        images = client.execute(
            f"SELECT sum(image_count), any(image_uris[1]) FROM results_dedup "
            f"WHERE request_id IN ({ids}) AND status = 'SUCCEEDED'"
        )
    finally:
        client.close()
    echo("")
    echo(f"results ({len(requests)} requests, from ClickHouse {mask_secrets(settings.clickhouse.url)}):")
    for status, code, n in by_status:
        echo(f"  {status:<10} {code or '':<22} {n}")
    echo("stages:       count   queue p50/p95 ms   compute p50/p95 ms   cost USD   max batch")
    for stage, n, q50, q95, c50, c95, cost, batch in stages:
        echo(f"  {stage:<17} {n:>4}   {q50:>7.0f} /{q95:>7.0f}   {c50:>8.0f} /{c95:>8.0f}   {cost:>9.6f}   {batch:>4}")
    echo("what ran:     variant                    model        scheduler  steps  guidance  results  max batch")
    for variant, model, scheduler, steps, guidance, n, batch in what_ran:
        echo(f"  {variant:<27} {model:<12} {scheduler:<10} {steps:>5}  {guidance:>8.1f}  {n:>7}  {batch:>9}")
    price = settings.stages.device_hour_price_usd
    echo(f"total cost: {sum(row[6] for row in stages):.6f} USD at {price} USD per device-hour")
    total_images, example = images[0]
    echo(f"{total_images} images stored under {mask_secrets(settings.objects.url)}, e.g. {example}")
    echo(f"analyse the experiment: pixelpipe analyze steps-test --experiments {settings.experiments.file}")
