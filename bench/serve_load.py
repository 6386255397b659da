#!/usr/bin/env python3
"""Load on OpenAI-compatible servers: `hone serve` against llama.cpp's `llama-server`.

C concurrent clients each send R streamed chat requests (four fixed prompts, max_tokens 64,
temperature 0, `ignore_eos` so every answer is 64 tokens on both servers) and the script reports time to first token (p50/p95), aggregate decode
tokens/s (completion tokens of all requests over the wall time), each stream's own decode
rate (tokens after the first over the time after the first), failures, the server's peak RSS
and, for hone, how many exchanges its database recorded. Standard library only.

Against a server already running (one run, one line of JSON per client count):

    python3 bench/serve_load.py --url http://127.0.0.1:8080 --clients 1 4 8 --pid PID

Both servers, started fresh for every configuration and run, alternating so both see the
same load on a shared machine, with `--parallel C` / `-np C` for C clients; medians over the
runs, llama-server's figure beside hone's:

    python3 bench/serve_load.py --hone target/release/hone \\
        --llama-server /path/to/llama-server --model model.gguf --runs 3

(`LLAMA_SERVER` may give the llama-server path instead.) llama.cpp is not part of hone: build
it yourself (BENCHMARKS.md says how it was built for the published figures).
"""

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
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
                       "stream_options": {"include_usage": True}, "ignore_eos": True,
                       "messages": [{"role": "user", "content": prompt}]})
    t0 = time.monotonic()
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    first, last, tokens, pieces, buf = None, None, None, 0, b""
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            ev = ev.strip()
            if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                continue
            j = json.loads(ev[6:])
            for ch in j.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    now = time.monotonic() - t0
                    pieces += 1
                    last = now
                    if first is None:
                        first = now
            if j.get("usage"):
                tokens = j["usage"]["completion_tokens"]
    c.close()
    if first is None:
        raise RuntimeError("no content in the stream")
    if tokens is None:
        tokens = pieces  # one token per chunk when the server gives no usage
    rate = (tokens - 1) / (last - first) if tokens > 1 and last > first else None
    return first, tokens, rate


def run(url, clients, requests, max_tokens):
    ttft, tokens, rates, failures = [], [], [], []
    lock = threading.Lock()

    def client(i):
        for k in range(requests):
            try:
                f, n, rate = one(url, PROMPTS[(i + k) % len(PROMPTS)], max_tokens)
                with lock:
                    ttft.append(f)
                    tokens.append(n)
                    if rate:
                        rates.append(rate)
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
            "aggregate_tokens_per_s": round(sum(tokens) / wall, 1),
            "stream_decode_tokens_per_s": round(statistics.median(rates), 1) if rates else None,
            "completion_tokens": sum(tokens), "wall_s": round(wall, 1),
            "failures": len(failures), "first_failure": failures[0] if failures else None}


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, proc, timeout=120):
    u = urllib.parse.urlparse(url)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server never became healthy")


def start(kind, a, parallel, home):
    port = free_port()
    if kind == "hone":
        cmd = [a.hone, "-t", str(a.threads), "--model", a.model, "--ctx", str(a.ctx),
               "serve", "--port", str(port), "--parallel", str(parallel)]
        env = dict(os.environ, HONE_HOME=home)
    else:
        # llama-server splits -c over its slots: each slot gets the context hone's sequences get.
        cmd = [a.llama_server, "-m", a.model, "-t", str(a.threads), "-c", str(a.ctx * parallel),
               "-np", str(parallel), "--port", str(port), "--host", "127.0.0.1"]
        env = dict(os.environ)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
    except Exception:
        proc.kill()
        proc.wait()
        raise
    return proc, url, " ".join(cmd)


def exchanges(a, home):
    out = subprocess.run([a.hone, "history", "--json", "-n", "100000"], env=dict(
        os.environ, HONE_HOME=home), capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if line.strip() and json.loads(line).get("kind") == "serve")


def compare(a):
    results = {}
    for c in a.clients:
        for r in range(a.runs):
            for kind in ("hone", "llama"):
                home = tempfile.mkdtemp(prefix="hone-bench-")
                try:
                    proc, url, cmd = start(kind, a, c, home)
                    try:
                        m = run(url, c, a.requests, a.max_tokens)
                        m["server_peak_rss_mb"] = peak_rss_mb(proc.pid)
                    finally:
                        proc.terminate()
                        proc.wait()
                    if kind == "hone":
                        m["exchanges_recorded"] = exchanges(a, home)
                finally:
                    shutil.rmtree(home, ignore_errors=True)
                with open("/proc/loadavg") as f:
                    m["loadavg"] = " ".join(f.read().split()[:3])
                m.update(server=kind, run=r + 1, command=cmd)
                print(json.dumps(m), flush=True)
                results.setdefault((c, kind), []).append(m)
    med = lambda rs, k: statistics.median(x[k] for x in rs if x[k] is not None) \
        if any(x[k] is not None for x in rs) else None
    print(f"\nmedians over {a.runs} runs; {a.requests} requests per client, max_tokens {a.max_tokens}")
    print("| clients | server | first token p50 / p95 ms | aggregate tok/s | stream decode tok/s "
          "| failures | peak RSS MiB | recorded |")
    print("|---|---|---|---|---|---|---|---|")
    for c in a.clients:
        h, l = results[(c, "hone")], results[(c, "llama")]
        for name, rs in (("hone --parallel %d" % c, h), ("llama-server -np %d" % c, l)):
            rec = "/".join(str(x.get("exchanges_recorded", "-")) for x in rs)
            print(f"| {c} | {name} | {med(rs, 'ttft_p50_ms')} / {med(rs, 'ttft_p95_ms')} "
                  f"| {med(rs, 'aggregate_tokens_per_s')} | {med(rs, 'stream_decode_tokens_per_s')} "
                  f"| {sum(x['failures'] for x in rs)} | {max(x['server_peak_rss_mb'] for x in rs)} "
                  f"| {rec} |")
        ratio = lambda k: (med(h, k) / med(l, k)) if med(h, k) and med(l, k) else None
        fmt = lambda v: f"{v:.2f}x" if v else "-"
        print(f"| {c} | hone / llama | {fmt(ratio('ttft_p50_ms'))} | {fmt(ratio('aggregate_tokens_per_s'))} "
              f"| {fmt(ratio('stream_decode_tokens_per_s'))} | | | |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:8080", help="a running server (alone)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=20, help="per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--pid", type=int, help="the running server's pid, for its peak RSS")
    p.add_argument("--hone", help="the hone binary: start hone serve and llama-server and compare")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    p.add_argument("--model", help="the GGUF both servers load")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=2048, help="context per sequence")
    a = p.parse_args()
    if a.hone:
        if not a.llama_server or not a.model:
            p.error("--hone needs --llama-server (or LLAMA_SERVER) and --model")
        compare(a)
        return
    for c in a.clients:
        r = run(a.url, c, a.requests, a.max_tokens)
        if a.pid:
            r["server_peak_rss_mb"] = peak_rss_mb(a.pid)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
