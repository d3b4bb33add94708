"""How long a moderation worker takes to recover the per-user limits table, by table store.

    python benchmarks/table_recovery.py [--users 1000000] [--partitions 8] [--store memory]
    python benchmarks/table_recovery.py --store rocksdb --data-dir DIR                 (a new host: DIR empty)
    python benchmarks/table_recovery.py --store rocksdb --data-dir DIR --app-id APP_ID  (a restart: DIR kept)

Writes ``--users`` buckets to a fresh user-limits changelog topic, as moderation writes them (JSON user: JSON
[tokens, at, compute tokens, compute at], on the user's partition), unless ``--app-id`` names one written before;
then starts a worker-like Faust app (the table, and an agent on a source topic of as many partitions, so the app
owns every partition) and prints the seconds from its start to the table holding every user (Faust's recovery
done), and the app id to reuse. With RocksDB a restart on the same host reads only what the changelog gained since
its folder was written; a new host (a pod without a volume) reads it all. ``rocksdb`` needs the ``rocksdict``
package, which pixelpipe does not install (docs/operators/workers.md, "Fair share").

Runs on the local stack (started when no Kafka answers at PIXELPIPE_KAFKA_BOOTSTRAP, stopped afterwards).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from tqdm import tqdm

from pixelpipe.core.settings import Settings, section_from_env
from pixelpipe.core.topics import user_partition
from pixelpipe.tools.stack import StackSettings, stack_unless_kafka_answers


def write_changelog(bootstrap: str, app_id: str, users: int, partitions: int) -> None:
    """The app's changelog, and its agent's source topic, which gives the app the changelog's partitions."""
    topic = f"{app_id}-user-limits-changelog"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    created = admin.create_topics(
        [
            NewTopic(topic, partitions, 1, config={"cleanup.policy": "compact"}),
            NewTopic(f"{app_id}-source", partitions, 1),
        ]
    )
    for future in created.values():
        future.result()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "zstd"})
    now_s = time.time()
    for i in tqdm(range(users), desc="changelog", unit="user", mininterval=2.0):
        user = f"user-{i}"
        value = json.dumps([9.0, now_s, 2400.0, now_s]).encode()
        while True:
            try:
                producer.produce(topic, value, json.dumps(user).encode(), user_partition(user, partitions))
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120):
        raise SystemExit("the changelog was not acknowledged in 120 s")


def recover(bootstrap: str, app_id: str, partitions: int, users: int, store: str, data_dir: str) -> float:
    """In this process: a Faust app with the table; returns the seconds from start to every user recovered."""
    import faust

    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        store=store,
        datadir=data_dir,
        web_enabled=False,
        topic_partitions=partitions,
        consumer_auto_offset_reset="earliest",
    )
    table = app.Table("user-limits", partitions=partitions)
    source = app.topic(f"{app_id}-source", partitions=partitions, key_serializer="raw", value_serializer="raw")
    started_s = time.monotonic()
    recovered: list[float] = []

    @app.agent(source)
    async def idle(stream: faust.StreamT) -> None:
        async for _ in stream:
            pass

    @app.timer(interval=0.2)
    async def watch() -> None:
        if not recovered and app.tables.recovery.completed.is_set() and len(table) >= users:
            recovered.append(time.monotonic() - started_s)
            await app.stop()

    worker = faust.Worker(app, quiet=True, loglevel="WARNING")
    worker.spinner = None
    with contextlib.suppress(SystemExit):
        worker.execute_from_commandline()
    if not recovered:
        raise SystemExit("the table was not recovered")
    return recovered[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--store", choices=["memory", "rocksdb"], default="memory")
    parser.add_argument("--data-dir", help="the table store's folder (default: a new temporary one)")
    parser.add_argument("--app-id", help="recover the changelog this earlier run wrote, instead of a new one")
    args = parser.parse_args()
    base = Settings.from_env()
    with stack_unless_kafka_answers(base, section_from_env(StackSettings, os.environ), print) as settings:
        bootstrap = settings.kafka.bootstrap
        app_id = args.app_id or f"recovery-{uuid.uuid4().hex[:8]}"
        if args.app_id is None:
            written_s = time.monotonic()
            write_changelog(bootstrap, app_id, args.users, args.partitions)
            print(f"{args.users:,} users written to the changelog in {time.monotonic() - written_s:.1f} s")
        data_dir = args.data_dir or tempfile.mkdtemp()
        seconds = recover(bootstrap, app_id, args.partitions, args.users, f"{args.store}://", data_dir)
        print(
            f"{args.store} store: {args.users:,} users in {args.partitions} partitions recovered in {seconds:.1f} s "
            f"(app id {app_id}, data in {data_dir})"
        )


if __name__ == "__main__":
    main()
