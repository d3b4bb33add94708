"""The local stack: real Kafka, ClickHouse and S3 servers on 127.0.0.1, for machines without Docker.

Each service has its own data directory under ``StackSettings.dir``, a log file, a pid file, a readiness probe
and a clean shutdown (SIGTERM to its process group, SIGKILL after a grace period).
"""

from pixelpipe.tools.stack.services import (
    LocalStack,
    ServiceStatus,
    StackError,
    free_port,
    port_bindable,
    stack_unless_kafka_answers,
)
from pixelpipe.tools.stack.settings import StackSettings

__all__ = [
    "LocalStack",
    "ServiceStatus",
    "StackError",
    "StackSettings",
    "free_port",
    "port_bindable",
    "stack_unless_kafka_answers",
]
