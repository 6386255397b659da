#!/usr/bin/env python3
"""Load on an OpenAI-compatible server (`hone serve`, or llama-server for comparison).

C concurrent clients each send R streamed chat requests (fixed prompts, max_tokens 64,
temperature 0) and the script prints time to first token (p50/p95), aggregate decode
tokens/s (completion tokens of all requests over the wall time), failures, and the server's
peak RSS when its pid is given. Standard library only.

    python3 bench/serve_load.py --url http://127.0.0.1:8080 --clients 1 4 8 --requests 20 --pid PID
"""

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse

PROMPTS = [
    "Write a short story about a dragon who lives in a castle.",
    "Explain how a bicycle works.",
    "Describe a walk through a forest in autumn.",
    "What should I pack for a weekend of hiking?",
]


def one(url, prompt, max_tokens):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    body = json.dumps({"model": "any", "stream": True, "temperature": 0, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": prompt}]})
    t0 = time.monotonic()
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    first, tokens, buf = None, None, b""
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                continue
            j = json.loads(ev[6:])
            for ch in j.get("choices") or []:
                if first is None and (ch.get("delta") or {}).get("content"):
                    first = time.monotonic() - t0
            if j.get("usage"):
                tokens = j["usage"]["completion_tokens"]
    c.close()
    if first is None or tokens is None:
        raise RuntimeError("no content or no usage in the stream")
    return first, tokens


def run(url, clients, requests, max_tokens):
    ttft, tokens, failures = [], [], []
    lock = threading.Lock()

    def client(i):
        for k in range(requests):
            try:
                f, n = one(url, PROMPTS[(i + k) % len(PROMPTS)], max_tokens)
                with lock:
                    ttft.append(f)
                    tokens.append(n)
            except Exception as e:  # counted, shown
                with lock:
                    failures.append(str(e))

    t0 = time.monotonic()
    ts = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.monotonic() - t0
    q = statistics.quantiles(ttft, n=20) if len(ttft) >= 2 else ttft * 19
    return {"clients": clients, "requests": len(ttft) + len(failures),
            "ttft_p50_ms": round(statistics.median(ttft) * 1000) if ttft else None,
            "ttft_p95_ms": round(q[18] * 1000) if ttft else None,
            "aggregate_tokens_per_s": round(sum(tokens) / wall, 1), "wall_s": round(wall, 1),
            "failures": len(failures), "first_failure": failures[0] if failures else None}


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=20, help="per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--pid", type=int, help="the server's pid, for its peak RSS")
    a = p.parse_args()
    for c in a.clients:
        r = run(a.url, c, a.requests, a.max_tokens)
        if a.pid:
            r["server_peak_rss_mb"] = peak_rss_mb(a.pid)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
