#!/usr/bin/env python3
"""Forgetting, measured (issue 21): learn a set of notes in one cycle, remove every fourth
note, and ask every question from the weights (`hone ask --no-retrieval`, greedy):

  - before the removal: every note's questions;
  - right after `hone note rm` (answers about a removed note are held back);
  - after `hone learn --forget-now` (the adapter rebuilt without the removed notes);
  - the base model (`--base`) on the removed notes' questions.

Target: after the rebuild, removed notes at the base model's level, and kept notes at >= 95%
of their accuracy before the removal. An answer is right when it contains an accepted alias
(case-insensitive), as `hone eval` scores.

usage: bench/forget.py HONE_BINARY MODEL.gguf NOTES.jsonl WORKDIR [--every 4] [--seed 1]
"""
import argparse, json, os, subprocess, sys, time

ap = argparse.ArgumentParser()
ap.add_argument("hone")
ap.add_argument("model")
ap.add_argument("notes")
ap.add_argument("work")
ap.add_argument("--every", type=int, default=4)
ap.add_argument("--seed", type=int, default=1)
a = ap.parse_args()
home = os.path.join(a.work, "home")
if os.path.exists(home):
    sys.exit(f"{home} exists: give an empty WORKDIR")
os.makedirs(a.work, exist_ok=True)
env = dict(os.environ, HONE_HOME=home)
env.pop("HONE_MODEL", None)


def hone(*args):
    r = subprocess.run([a.hone, "--model", a.model, *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"hone {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r.stdout


def last_json(out):
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])


def score(qs, base=False):
    right = 0
    for q in qs:
        args = ["ask", "--json", "--no-retrieval", "--temperature", "0", "-n", "48"]
        if base:
            args.append("--base")
        ans = last_json(hone(*args, q["q"]))["answer"].lower()
        right += any(x.lower() in ans for x in q["a"])
    return right


notes = [json.loads(l) for l in open(a.notes) if l.strip()]
for n in notes:
    hone("note", "add", n["note"])  # ids 1..N in a fresh data directory
removed = [i for i in range(len(notes)) if i % a.every == a.every - 1]
kept = [i for i in range(len(notes)) if i not in removed]
rq = [q for i in removed for q in notes[i]["questions"]]
kq = [q for i in kept for q in notes[i]["questions"]]
t = time.time()
cycle = last_json(hone("learn", "--json", "--seed", str(a.seed), "--max-notes", str(len(notes))))
learn_s = time.time() - t
print(f"learn: {learn_s:.0f} s, activated {cycle.get('activated')}: {cycle.get('reason')}", flush=True)
before = (score(rq), score(kq))
print(f"before rm: removed {before[0]}/{len(rq)}, kept {before[1]}/{len(kq)}", flush=True)
hone("note", "rm", *[str(i + 1) for i in removed])
held = score(rq)
print(f"right after rm (held back): removed {held}/{len(rq)}", flush=True)
t = time.time()
rebuild = last_json(hone("learn", "--forget-now", "--json", "--seed", str(a.seed)))
rebuild_s = time.time() - t
print(f"rebuild: {rebuild_s:.0f} s, activated {rebuild.get('activated')}: {rebuild.get('reason')}", flush=True)
after = (score(rq), score(kq))
base = score(rq, base=True)
print(f"after rebuild: removed {after[0]}/{len(rq)} (base model {base}/{len(rq)}), kept {after[1]}/{len(kq)}", flush=True)
kept_share = after[1] / before[1] if before[1] else float("nan")
print(json.dumps({
    "notes": len(notes), "removed_notes": len(removed),
    "removed_questions": len(rq), "kept_questions": len(kq),
    "before": {"removed": before[0], "kept": before[1]},
    "held_back": held,
    "after": {"removed": after[0], "kept": after[1]},
    "base_removed": base,
    "kept_share": kept_share,
    "learn_s": learn_s, "rebuild_s": rebuild_s,
    "rebuild_activated": rebuild.get("activated"),
    "removed_at_base_level": after[0] <= base,
    "kept_95": kept_share >= 0.95,
}))
