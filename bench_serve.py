"""Benchmark serve.py: continuous batching against serving requests one at a time.

    python bench_serve.py                                  # the newest checkpoint, 1, 4 and 16 clients
    python bench_serve.py --checkpoint checkpoint/sft --clients 1,8,32 --max_tokens 128 --rounds 3

Two servers run the same checkpoint as subprocesses: 'batched' (--max_batch 16, engine.py's continuous batching)
and 'one at a time' (--max_batch 1: requests queue and are generated one after the other). For each number of
concurrent clients, every client sends --requests requests one after the other (streamed chat completions of
a fixed length: ignore_eos, so every request generates exactly --max_tokens tokens) and measures the time to
its first token and its whole latency. Aggregate tokens/s = all generated tokens / the wall time of the run.
Only one server is loaded at a time, and the two take turns configuration by configuration and round by round,
so that a change in the machine's load hits both; the load average is recorded beside each run.
"""

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from configs import option, parse_args

QUESTION = "Tom found a red kite in the park. Tom gave the kite to Mia.\n\nWho found the kite?"


@dataclass
class BenchServeConfig:
    checkpoint: str | None = option("checkpoint to serve; None = the newest under checkpoint/", default=None)
    clients: str = option("comma-separated numbers of concurrent clients", default="1,4,16")
    requests: int = option("requests each client sends, one after the other", default=2)
    max_tokens: int = option("tokens generated per request (the end-of-reply token is ignored)", default=64)
    max_batch: int = option("the batched server's --max_batch", default=16)
    rounds: int = option("times every configuration runs (interleaved)", default=2)
    threads: int = option("torch threads of each server (OMP_NUM_THREADS)", default=1)
    temperature: float = option("sampling temperature of the requests (top_p 1: OpenAI's defaults)", default=1.0)
    out: str = option("write the results as JSON here; '' = no file", default="")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """serve.py in a subprocess on a free port, until close()."""

    def __init__(self, cfg: BenchServeConfig, max_batch: int):
        self.port = free_port()
        args = [sys.executable, str(Path(__file__).with_name("serve.py")), "--port", str(self.port),
                "--max_batch", str(max_batch), "--max_queue", "1024", "--max_tokens", str(cfg.max_tokens)]
        args += ["--checkpoint", cfg.checkpoint] if cfg.checkpoint else []
        threads = str(cfg.threads)
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log,
                                     env={**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
        deadline = time.monotonic() + 120
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"serve.py did not start:\n{self.log.read().decode()[-2000:]}")
            time.sleep(0.2)
        self.model = self.get("/v1/models")["data"][0]["id"]

    def get(self, path: str) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())

    def healthy(self) -> bool:
        try:
            return self.get("/health")["status"] == "ok"
        except OSError:
            return False

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def one_request(port: int, body: dict) -> tuple[float, float, int]:
    """(seconds to the first token, seconds to the end, tokens generated) of one streamed chat completion."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    # Server-sent events arrive line by line as they are generated. Only the last one (usage) is parsed, to keep
    # the clients, which share the machine with the server, cheap: the first event is the role, the second the
    # first text.
    events, first, last = 0, None, b""
    for line in response:
        if line.startswith(b"data: {"):
            events += 1
            first = time.perf_counter() if events == 2 else first
            last = line
    end = time.perf_counter()
    conn.close()
    return first - start, end - start, json.loads(last[6:])["usage"]["completion_tokens"]


def run_clients(server: ServerProcess, cfg: BenchServeConfig, clients: int) -> dict:
    """clients threads, each sending cfg.requests requests in turn; the figures of the whole run."""
    body = {"model": server.model, "messages": [{"role": "user", "content": QUESTION}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": cfg.max_tokens, "ignore_eos": True,
            "temperature": cfg.temperature}
    results, errors = [], []

    def client():
        try:
            for _ in range(cfg.requests):
                results.append(one_request(server.port, body))
        except Exception as e:  # reported below, not lost in a thread
            errors.append(e)

    load = os.getloadavg()[0]
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]}")
    ttft, latency, tokens = zip(*results)
    if set(tokens) != {cfg.max_tokens}:
        raise RuntimeError(f"requests generated {sorted(set(tokens))} tokens, not {cfg.max_tokens} each")
    return {"tokens_per_s": sum(tokens) / wall, "tokens": sum(tokens), "seconds": wall, "ttft": list(ttft),
            "latency": list(latency), "load": (load + os.getloadavg()[0]) / 2}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main(cfg: BenchServeConfig) -> dict:
    counts = [int(c) for c in cfg.clients.split(",")]
    servers = {"batched": ServerProcess(cfg, cfg.max_batch), "one at a time": ServerProcess(cfg, 1)}
    runs = {(mode, c): [] for c in counts for mode in servers}
    try:
        for server in servers.values():  # warm-up: first calls are slower
            run_clients(server, cfg, 1)
        for r in range(cfg.rounds):
            for c in counts:
                order = list(servers) if (r + c) % 2 == 0 else list(reversed(servers))
                for mode in order:
                    runs[mode, c].append(run_clients(servers[mode], cfg, c))
                    last = runs[mode, c][-1]
                    print(f"round {r + 1}, {c:>2} clients, {mode:>13}: {last['tokens_per_s']:7.1f} tokens/s, "
                          f"load {last['load']:.1f}", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.close()
    report = {"config": asdict(cfg), "cpus": os.cpu_count(), "rows": []}
    single = {r: runs["batched", counts[0]][r]["tokens_per_s"] for r in range(cfg.rounds)}
    for (mode, c), rs in runs.items():
        ttft = [t for run in rs for t in run["ttft"]]
        latency = [t for run in rs for t in run["latency"]]
        report["rows"].append({
            "server": mode, "clients": c, "tokens_per_s": statistics.median(run["tokens_per_s"] for run in rs),
            f"x_{counts[0]}_client_batched": [round(run["tokens_per_s"] / single[i], 2) for i, run in enumerate(rs)],
            "ttft_p50_s": percentile(ttft, 50), "latency_p50_s": percentile(latency, 50),
            "latency_p99_s": percentile(latency, 99), "requests": len(latency),
            "load": statistics.mean(run["load"] for run in rs)})
    print_table(report, counts[0])
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


def print_table(report: dict, base: int):
    print(f"| server | clients | tokens/s | × {base} client, per round | first token p50 | latency p50 | "
          f"latency p99 | requests | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in sorted(report["rows"], key=lambda r: (r["server"] != "batched", r["clients"])):
        ratios = ", ".join(f"{x:.2f}" for x in row[f"x_{base}_client_batched"])
        print(f"| {row['server']} | {row['clients']} | {row['tokens_per_s']:.0f} | {ratios} | "
              f"{row['ttft_p50_s'] * 1000:.0f} ms | {row['latency_p50_s']:.2f} s | {row['latency_p99_s']:.2f} s | "
              f"{row['requests']} | {row['load']:.1f} |")


if __name__ == "__main__":
    main(parse_args(BenchServeConfig, description=__doc__))
