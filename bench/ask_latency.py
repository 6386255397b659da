#!/usr/bin/env python3
"""`hone ask` latency with retrieval and without (issue 21's target: with <= 1.2x without), on a
data directory holding a scale set's notes (bench/scale.py), alternating the two per question.

usage: bench/ask_latency.py HONE_BINARY MODEL.gguf NOTES.jsonl WORKDIR [--questions 20]

Prints per variant the median wall time of the whole command (start, model load, search,
answer), the median time to the answer's end inside hone (prompt + generation), and the median
answer length, then the ratios. Answers are greedy, at most 48 tokens.
"""
import argparse, json, os, statistics, subprocess, sys, time

ap = argparse.ArgumentParser()
ap.add_argument("hone"); ap.add_argument("model"); ap.add_argument("notes"); ap.add_argument("work")
ap.add_argument("--questions", type=int, default=20)
a = ap.parse_args()
home = os.path.join(a.work, "home")
env = dict(os.environ, HONE_HOME=home)
env.pop("HONE_MODEL", None)
notes = [json.loads(l) for l in open(a.notes) if l.strip()]
if not os.path.exists(home):
    os.makedirs(a.work, exist_ok=True)
    with open(os.path.join(a.work, "notes.txt"), "w") as f:
        pass
    for n in notes:
        subprocess.run([a.hone, "--model", a.model, "note", "add", n["note"]], env=env, check=True,
                       capture_output=True)
qs = [q["q"] for n in notes for q in n["questions"]][: a.questions]
res = {"retrieval": [], "no-retrieval": []}
for q in qs:
    for variant in ("retrieval", "no-retrieval"):
        args = [a.hone, "--model", a.model, "ask", "--json", "--temperature", "0", "-n", "48"]
        if variant == "no-retrieval":
            args.append("--no-retrieval")
        t = time.time()
        r = subprocess.run(args + [q], env=env, capture_output=True, text=True)
        wall = time.time() - t
        if r.returncode != 0:
            sys.exit(f"ask failed: {r.stderr}")
        j = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
        res[variant].append((wall, j["prompt_ms"] + j["generate_ms"], j["completion_tokens"], j["prompt_tokens"]))
out = {}
for v, rows in res.items():
    out[v] = {
        "wall_s": statistics.median(r[0] for r in rows),
        "answer_ms": statistics.median(r[1] for r in rows),
        "completion_tokens": statistics.median(r[2] for r in rows),
        "prompt_tokens": statistics.median(r[3] for r in rows),
    }
    print(f"{v:13} wall {out[v]['wall_s']:.2f} s, prompt+answer {out[v]['answer_ms']:.0f} ms, "
          f"{out[v]['prompt_tokens']:.0f} prompt tokens, {out[v]['completion_tokens']:.0f} answer tokens (medians of {len(rows)})")
ratio = out["retrieval"]["wall_s"] / out["no-retrieval"]["wall_s"]
print(f"wall ratio retrieval / no-retrieval: {ratio:.2f}x")
print(json.dumps({"notes": len(notes), "questions": len(qs), **out, "wall_ratio": ratio,
                  "load_avg": open("/proc/loadavg").read().split()[:3]}))
