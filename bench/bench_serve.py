"""Load on `pearlmoe serve` over loopback: N concurrent streaming clients with a fixed request
mix, against an autoregressive, a speculative and a PEARL server in one run (each started as
`pearlmoe serve` in its own process, the default backend, compile time not counted; each client
count runs the modes in turn, in a rotating order).

Every client is closed-loop: it sends its next request when the last one has finished. The mix
is held-out stdlib prompts (48 tokens, sent as token ids) with 32-128 new tokens, greedy, so
every response is checked against the greedy autoregressive continuation computed here first: a
response that differs is "corrupted", one that never completes is "lost". Reported per mode and
client count: aggregate tokens/s (completion tokens over the level's wall time), time to first
token and inter-chunk latency p50/p99 (the gap between streamed chunks, what a reader sees; a
speculative chunk can carry several tokens), tokens per chunk. ``--soak S`` then runs 16
clients for S seconds that disconnect at random (a third of the requests hang up after a few
chunks) and checks every completed response, and that no slot or queue entry is left behind.

    python bench/bench_serve.py [--clients 1 4 16] [--modes ar speculative pearl]
        [--requests-per-client 4] [--max-batch 16] [--soak 600]
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from common import write_json
from pearlmoe import generate
from pearlmoe.cli import TARGET, held_out_prompts, load_tokenizer
from pearlmoe.model import from_pretrained
from pearlmoe.serve.server import parse_metrics

BUDGETS = [64, 128, 32, 96, 64, 128, 48, 80]
NAME = "tiny-target"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`pearlmoe serve` in a child process, up when /health answers."""

    def __init__(self, mode: str, max_batch: int, context: int, extra: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pearlmoe.cli", "serve", "--mode", mode,
               "--port", str(self.port), "--max-batch", str(max_batch),
               "--context", str(context), *extra]  # fmt: skip
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_{mode}.log"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                     stderr=self.log.open("w"))  # fmt: skip
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{mode} server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - start > 900:
                raise RuntimeError(f"{mode} server did not start in 15 minutes")
            time.sleep(0.5)
        self.startup = time.monotonic() - start

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics").text)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int,
                      hang_up_after: int | None = None) -> dict:  # fmt: skip
    """Stream one completion: its text, chunk arrival times, usage; hang_up_after: close the
    connection after that many chunks."""
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    out = {"text": [], "times": [], "usage": None, "error": None, "hung_up": False}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as res:
            if res.status_code != 200:
                out["error"] = f"HTTP {res.status_code}: {(await res.aread())[:200]!r}"
                return out
            async for line in res.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    out["usage"] = chunk["usage"]
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    out["times"].append(time.perf_counter() - start)
                    out["text"].append(chunk["choices"][0]["text"])
                    if hang_up_after is not None and len(out["times"]) >= hang_up_after:
                        out["hung_up"] = True
                        return out
    except httpx.HTTPError as err:
        out["error"] = repr(err)
    return out


def ratio(m: dict[str, float], num: str, den: str) -> float:
    """A ratio of two pearlmoe counters (deltas over one level)."""
    d = m.get(f"pearlmoe_{den}_total", 0.0)
    return m.get(f"pearlmoe_{num}_total", 0.0) / d if d else float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_level(url: str, mix: list[tuple[list[int], int, str]], clients: int,
                    per_client: int) -> dict:  # fmt: skip
    """clients closed-loop clients, per_client requests each, the mix in a fixed order."""
    order = iter(range(clients * per_client))
    results: list[tuple[int, dict]] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        for k in order:
            prompt, budget, _ = mix[k % len(mix)]
            results.append((k, await one_request(client, url, prompt, budget)))

    limits = httpx.Limits(max_connections=clients + 4)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    wall = time.perf_counter() - start
    tokens, ttft, gaps, chunks, corrupted, lost = 0, [], [], 0, 0, 0
    for k, r in results:
        if r["error"] or r["usage"] is None:
            lost += 1
            continue
        corrupted += "".join(r["text"]) != mix[k % len(mix)][2]
        tokens += r["usage"]["completion_tokens"]
        ttft.append(r["times"][0])
        gaps += [b - a for a, b in zip(r["times"], r["times"][1:], strict=False)]
        chunks += len(r["times"])
    lost += clients * per_client - len(results)
    return {
        "clients": clients, "requests": len(results), "tokens": tokens, "seconds": wall,
        "tokens_per_second": tokens / wall, "ttft_p50_ms": 1e3 * percentile(ttft, 0.5),
        "ttft_p99_ms": 1e3 * percentile(ttft, 0.99), "itl_p50_ms": 1e3 * percentile(gaps, 0.5),
        "itl_p99_ms": 1e3 * percentile(gaps, 0.99), "tokens_per_chunk": tokens / max(chunks, 1),
        "corrupted": corrupted, "lost": lost,
    }  # fmt: skip


async def soak(url: str, mix: list, seconds: float, clients: int) -> dict:
    """clients clients for `seconds`, a third of their requests hanging up after 1-5 chunks."""
    rng = random.Random(0)
    stats = {"completed": 0, "hung_up": 0, "corrupted": 0, "lost": 0, "errors": []}
    deadline = time.perf_counter() + seconds

    async def client_loop(client: httpx.AsyncClient, seed: int) -> None:
        local = random.Random(seed)
        while time.perf_counter() < deadline:
            k = local.randrange(len(mix))
            prompt, budget, want = mix[k]
            hang = local.randint(1, 5) if local.random() < 1 / 3 else None
            r = await one_request(client, url, prompt, budget, hang)
            if r["hung_up"]:
                stats["hung_up"] += 1
            elif r["error"] or r["usage"] is None:
                stats["lost"] += 1
                stats["errors"].append(r["error"])
            else:
                stats["completed"] += 1
                stats["corrupted"] += "".join(r["text"]) != want

    async with httpx.AsyncClient(timeout=None) as client:
        await asyncio.gather(*(client_loop(client, rng.randrange(1 << 30)) for _ in range(clients)))
    stats["errors"] = stats["errors"][:5]
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--modes", nargs="+", default=["ar", "speculative", "pearl"])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--soak", type=float, default=0.0, help="seconds of random-disconnect "
                        "soak per mode (0: none)")  # fmt: skip
    parser.add_argument("--soak-modes", nargs="+", default=None)
    parser.add_argument("--server-args", default="", help="extra `pearlmoe serve` flags")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    tokenizer = load_tokenizer(TARGET)
    target = from_pretrained(TARGET, dtype=torch.bfloat16)
    eos = target.config.eos_token_id
    prompts = held_out_prompts(tokenizer, len(BUDGETS), 48)
    mix = []
    for prompt, budget in zip(prompts, BUDGETS, strict=True):  # the greedy references
        ids = generate(target, [prompt], budget, eos_token_id=eos)[0]
        mix.append((prompt, budget, tokenizer.decode(ids, skip_special_tokens=True)))
    del target  # the servers load their own

    # All servers up at once (an idle one waits without using the CPU), then every client count
    # runs each mode in turn, the order rotating: this VM's speed drifts between minutes, and
    # the modes should see the same minutes.
    servers = {}
    for mode in args.modes:
        servers[mode] = ServerProcess(mode, args.max_batch, 512, args.server_args.split())
        print(f"[{mode}] server up in {servers[mode].startup:.0f} s (compile and cost curve)")
        asyncio.run(run_level(servers[mode].url, mix, 1, 1))  # one request to warm the sockets
    rows, soaks = [], {}
    for i, clients in enumerate(args.clients):
        for j in range(len(args.modes)):
            mode = args.modes[(i + j) % len(args.modes)]
            server = servers[mode]
            before = server.metrics()
            row = asyncio.run(run_level(server.url, mix, clients, args.requests_per_client))
            m = {k: v - before.get(k, 0.0) for k, v in server.metrics().items()}  # this level
            row.update(mode=mode,
                       acceptance=ratio(m, "draft_tokens_accepted", "draft_tokens_proposed"),
                       tokens_per_target_call=ratio(m, "generation_tokens", "target_calls"),
                       batch_mean=ratio(m, "batch_size_sum", "rounds"))  # fmt: skip
            rows.append(row)
            print(
                f"[{mode}] {clients:>2} clients: {row['tokens_per_second']:7.1f} tok/s, "
                f"TTFT p50 {row['ttft_p50_ms']:.0f} ms, ITL p50/p99 {row['itl_p50_ms']:.1f}/"
                f"{row['itl_p99_ms']:.1f} ms, corrupted {row['corrupted']}, lost {row['lost']}"
            )
    rows.sort(key=lambda r: (args.modes.index(r["mode"]), r["clients"]))
    for mode, server in servers.items():
        if args.soak and mode in (args.soak_modes or args.modes):
            result = asyncio.run(soak(server.url, mix, args.soak, 16))
            time.sleep(1.0)
            m = server.metrics()
            result["left_running"] = m["pearlmoe_requests_running"]
            result["left_waiting"] = m["pearlmoe_requests_waiting"]
            result["seconds"] = args.soak
            soaks[mode] = result
            print(f"[{mode}] soak {args.soak:.0f} s: {result}")
        server.close()

    base = {r["clients"]: r for r in rows if r["mode"] == "ar"}
    single = {r["mode"]: r for r in rows if r["clients"] == 1}
    for r in rows:
        ar = base.get(r["clients"])
        r["vs_ar"] = r["tokens_per_second"] / ar["tokens_per_second"] if ar else float("nan")
        one = single.get(r["mode"])
        r["vs_one_client"] = r["tokens_per_second"] / one["tokens_per_second"] if one else 1.0
        r["itl_p99_vs_one_client_p50"] = r["itl_p99_ms"] / one["itl_p50_ms"] if one else 1.0
    print(f"\n{'mode':<12}{'clients':>8}{'tok/s':>9}{'vs AR':>7}{'vs 1':>7}{'TTFT p50':>10}"
          f"{'ITL p50':>9}{'ITL p99':>9}{'p99/1p50':>9}{'tok/chunk':>10}{'accept':>8}"
          f"{'batch':>7}{'bad':>5}")  # fmt: skip
    for r in rows:
        print(f"{r['mode']:<12}{r['clients']:>8}{r['tokens_per_second']:>9.1f}{r['vs_ar']:>6.2f}x"
              f"{r['vs_one_client']:>6.2f}x{r['ttft_p50_ms']:>10.1f}{r['itl_p50_ms']:>9.2f}"
              f"{r['itl_p99_ms']:>9.2f}{r['itl_p99_vs_one_client_p50']:>9.2f}"
              f"{r['tokens_per_chunk']:>10.2f}{r['acceptance']:>8.2f}{r['batch_mean']:>7.1f}"
              f"{r['corrupted'] + r['lost']:>5}")  # fmt: skip
    payload = {"rows": rows, "soak": soaks, "max_batch": args.max_batch,
               "budgets": BUDGETS, "prompt_tokens": 48}  # fmt: skip
    path = write_json("bench_serve", torch.device("cpu"), payload, args.out)
    plot(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        clients = [r["clients"] for r in mine]
        left.plot(clients, [r["tokens_per_second"] for r in mine], marker="o", label=mode)
        right.plot(clients, [r["itl_p50_ms"] for r in mine], marker="o", label=f"{mode} p50")
        right.plot(clients, [r["itl_p99_ms"] for r in mine], marker="x", linestyle="--",
                   label=f"{mode} p99")  # fmt: skip
    left.set(xlabel="concurrent clients", ylabel="tokens/s (all clients)", xscale="log",
             title="pearlmoe serve: throughput")  # fmt: skip
    right.set(xlabel="concurrent clients", ylabel="ms between streamed chunks", xscale="log",
              title="inter-chunk latency")  # fmt: skip
    for ax in (left, right):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
