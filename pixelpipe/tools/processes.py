"""pixelpipe processes on this machine, for the demo and the tests: `pixelpipe worker` or `pixelpipe clickhouse sink`
with given settings."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from pixelpipe.core.settings import Settings


class PixelpipeProcess:
    """``pixelpipe ARGS`` as a subprocess with ``settings``; stops with SIGTERM (graceful) or ``kill`` (SIGKILL)."""

    def __init__(
        self, settings: Settings, args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.log_path = log_path
        env = os.environ | settings.to_env() | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"} | dict(env or {})
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pixelpipe", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP for the block, SIGCONT after: the process reads, commits and answers nothing meanwhile, like a
        hung one, and carries on after without a restart (a model load) if the block is shorter than its Kafka
        session timeout."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> PixelpipeProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class WorkerProcess(PixelpipeProcess):
    """``pixelpipe worker --stages ...``."""

    def __init__(
        self, settings: Settings, stages: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(settings, ["worker", "--stages", ",".join(stages)], log_path, env)

    def stacks(self, wait_s: float = 2.0) -> str:
        """What a live worker is doing: SIGUSR1 makes the worker (mode's) write every asyncio task's and thread's
        stack to its log, read back here; empty when it has exited or its event loop does not answer."""
        if self.process.poll() is not None:
            return ""
        before = self.log_path.stat().st_size
        self.process.send_signal(signal.SIGUSR1)
        time.sleep(wait_s)
        with open(self.log_path, "rb") as log:
            log.seek(before)
            return log.read().decode(errors="replace")
