"""``loom serve`` as a real process: it serves, and on SIGTERM lets in-flight requests finish
(or, past --graceful-timeout, cuts them off) and exits cleanly."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, model: Path, *extra: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "loom.cli", "serve", "--model", str(model), "--port", str(self.port),
               "--served-model-name", "tiny", "--dtype", "float32", "--threads", "1", "--num-blocks", "256", *extra]
        self.log = ""  # its output, once it has exited
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loom serve exited early:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("loom serve did not become healthy")
            time.sleep(0.1)

    def stream_lines(self, body: dict, lines: list[str], first: threading.Event, **headers: str) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, headers=headers, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()
        except httpx.TransportError as e:
            lines.append(f"transport error: {type(e).__name__}")
        finally:
            first.set()

    def metric(self, name: str) -> float:
        """The value of one sample of /metrics, e.g. ``loom_num_requests_running``."""
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no {name} in /metrics")

    def until(self, condition, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "condition not met in time"
            time.sleep(0.02)

    def stop(self) -> int:
        """SIGTERM, then its exit status; its output lands in ``log``."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.log = self.proc.stdout.read()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def test_a_client_that_hangs_up_is_aborted_without_a_traceback(tiny_model):
    srv = ServeProcess(tiny_model("llama"))
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 500, "ignore_eos": True}).encode()
    aborted = 'loom_request_finished_total{finish_reason="abort"}'
    try:
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:  # a non-streamed request
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            srv.until(lambda: srv.metric("loom_num_requests_running") == 1)
        srv.until(lambda: srv.metric(aborted) == 1)  # hung up: aborted, not generated to the end
        assert srv.metric("loom_num_requests_running") == 0
        srv.stop()
    finally:
        srv.close()
    assert "Traceback" not in srv.log and "Exception in ASGI application" not in srv.log, srv.log


def _sigterm_mid_stream(srv: ServeProcess, max_tokens: int, **headers: str) -> tuple[list[str], int]:
    body = {"model": "tiny", "prompt": "Tell me everything.", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    lines: list[str] = []
    first = threading.Event()
    client = threading.Thread(target=srv.stream_lines, args=(body, lines, first), kwargs=headers)
    client.start()
    assert first.wait(60)
    srv.proc.send_signal(signal.SIGTERM)
    client.join(60)
    code = srv.proc.wait(60)
    srv.log = srv.proc.stdout.read()
    return lines, code


def test_sigterm_lets_in_flight_requests_finish(tiny_model):
    srv = ServeProcess(tiny_model("llama"), "--api-key", "k", "--max-waiting", "8")
    try:
        assert httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
        lines, code = _sigterm_mid_stream(srv, 300, authorization="Bearer k")
    finally:
        srv.close()
    assert code == 0, srv.log
    assert lines[-1] == "data: [DONE]", lines[-3:]
    usage = json.loads(lines[-2].removeprefix("data: "))["usage"]
    assert usage["completion_tokens"] == 300  # the whole answer, although SIGTERM came after its first token
    assert json.loads(lines[-3].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


@pytest.mark.timeout(120)
def test_sigterm_past_the_graceful_timeout_ends_streams_with_an_error_and_exits(tiny_model):
    srv = ServeProcess(tiny_model("llama"), "--graceful-timeout", "0.2")
    try:
        lines, code = _sigterm_mid_stream(srv, 500)  # far longer than the grace period
    finally:
        srv.close()
    assert code == 0, srv.log
    assert lines[-1] == "data: [DONE]", lines[-3:]  # cut off, yet the stream ends properly
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_unavailable" and "shutting down" in error["message"]
    assert not any('"finish_reason":"length"' in line for line in lines)
    assert "Traceback" not in srv.log and "CancelledError" not in srv.log, srv.log
