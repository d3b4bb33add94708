"""The local stack: real Kafka, ClickHouse and S3 servers on 127.0.0.1, for machines without Docker.

Each service has its own data directory under ``settings.stack_dir``, a log file, a pid file, a readiness probe
and a clean shutdown (SIGTERM to its process group, SIGKILL after a grace period).
"""

from pixelpipe.stack.services import LocalStack, ServiceStatus, StackError

__all__ = ["LocalStack", "ServiceStatus", "StackError"]
