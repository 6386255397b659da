#!/usr/bin/env python3
"""The learning capacity curve (issue 21): how many notes one adapter holds before the earlier
ones fade.

N notes of the scale set (`bench/scale.py N --asked N`, every note with questions) are added to
a fresh data directory and learned as a user's idle cycles would learn them: `hone learn`, 20
notes a cycle (the default `--max-notes`), each cycle continuing from the adapter before it and
replaying earlier items. After every cycle, every question of every note learned so far is
asked from the weights alone (`hone eval --mode learn --answer-in HOME`: no note in the
prompt), with the general questions of the retention set. So the first batch's line shows
how its accuracy fades as later batches are learned on top of it. Before each cycle,
`hone learn --estimate --json` is run and recorded beside the cycle's own phases and steps
(issue 19: how the estimate holds on later cycles).

usage: bench/capacity.py HONE_BINARY MODEL.gguf RETENTION.jsonl WORKDIR [--notes 100]
       [--cycle 20] [--threads 2] [--plot PNG] [--plot-only]

Writes WORKDIR/capacity.json (one row per cycle, written as each cycle ends) and, with
matplotlib, the plot; `--plot-only` plots an existing WORKDIR/capacity.json (a run stopped
early, or one from another machine).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("hone")
ap.add_argument("model")
ap.add_argument("retention")
ap.add_argument("work")
ap.add_argument("--notes", type=int, default=100)
ap.add_argument("--cycle", type=int, default=20)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--plot", default=None)
ap.add_argument("--plot-only", action="store_true")
a = ap.parse_args()


def plot(data, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cycle = data["rows"], data["cycle"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    xs = [r["notes_learned"] for r in rows]
    for b in range(len(rows[-1]["per_batch"])):
        pts = [(r["notes_learned"], r["per_batch"][b]) for r in rows if len(r["per_batch"]) > b]
        ax.plot([p[0] for p in pts], [100 * p[1][0] / p[1][1] for p in pts], marker="o",
                ms=9, lw=1.5, zorder=3, alpha=0.85, label=f"notes {b * cycle + 1}-{(b + 1) * cycle}")
    ax.plot(xs, [100 * r["correct"] / r["total"] for r in rows], color="black", lw=1.5,
            ls=":", marker="s", ms=4, zorder=4, label="all notes learned so far")
    ax.plot(xs, [100 * r["retention_after"] for r in rows], color="grey", ls="--",
            label="general questions")
    ax.set_xlabel("notes learned (cycles of %d)" % cycle)
    ax.set_ylabel("answered right from the weights alone (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(xs)
    ax.set_title("hone: one r16 adapter, SmolLM2-135M Q4_1, scale-set notes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(png)
    print(f"plot: {png}")


if a.plot_only:
    plot(json.load(open(os.path.join(a.work, "capacity.json"))), a.plot)
    sys.exit(0)
here = os.path.dirname(os.path.abspath(__file__))
home = os.path.join(a.work, "home")
if os.path.exists(home):
    sys.exit(f"{home} exists: give an empty WORKDIR")
os.makedirs(a.work, exist_ok=True)
env = dict(os.environ, HONE_HOME=home)
env.pop("HONE_MODEL", None)


def hone(*args, home_env=None):
    r = subprocess.run(
        [a.hone, "-t", str(a.threads), "--model", a.model, *args],
        env=home_env or env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        sys.exit(f"hone {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r


def last_json(out):
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])


def load():
    return open("/proc/loadavg").read().split()[:3]


gen = subprocess.run(
    [sys.executable, os.path.join(here, "scale.py"), str(a.notes), "--asked", str(a.notes)],
    capture_output=True, text=True, check=True,
).stdout
notes = [json.loads(l) for l in gen.splitlines() if l.strip()]
with open(os.path.join(a.work, "notes.jsonl"), "w") as f:
    f.write(gen)
for n in notes:
    subprocess.run([a.hone, "--model", a.model, "note", "add", "-"], input=n["note"], env=env,
                   capture_output=True, text=True, check=True)
batches = [notes[i:i + a.cycle] for i in range(0, len(notes), a.cycle)]
rows = []
for c, _ in enumerate(batches):
    # What `hone learn --estimate` says of this cycle, measured just before it (issue 19: the
    # daemon plans with it), to hold against the cycle's own time.
    est = last_json(hone("learn", "--estimate", "--json", "--max-notes", str(a.cycle)).stdout)
    t = time.time()
    l0 = load()
    cycle = last_json(hone("learn", "--json", "--max-notes", str(a.cycle)).stdout)
    learn_s = time.time() - t
    gate = cycle.get("gate") or {}
    learned = [n for b in batches[: c + 1] for n in b]
    qa = os.path.join(a.work, f"learned-{c + 1}.jsonl")
    with open(qa, "w") as f:
        for n in learned:
            f.write(json.dumps(n) + "\n")
    r = hone("eval", "--qa", qa, "--retention", a.retention, "--mode", "learn", "--answer-in",
             home, "--keep", "--json", home_env=dict(env, HONE_HOME=os.path.join(a.work, "eval")))
    # `eval` runs the base model too: the learn mode's directory holds the weights' answers.
    kept = re.search(r"kept (\S*hone-eval-learn-\S+)", r.stderr + r.stdout).group(1)
    res = json.load(open(os.path.join(kept, "result.json")))
    summary = last_json(r.stdout)["modes"]["learn"]
    answers = iter(res["answers"])
    per_batch = []
    for b in batches[: c + 1]:
        qs = [q for n in b for q in n["questions"]]
        right = sum(next(answers)["correct"] for _ in qs)
        per_batch.append([right, len(qs)])
    row = {
        "cycle": c + 1,
        "notes_learned": len(learned),
        "activated": cycle.get("activated"),
        "reason": cycle.get("reason"),
        "train_tokens": cycle.get("train_tokens"),
        "learn_s": round(learn_s),
        "cycle_s": cycle.get("seconds"),
        "phases": gate.get("phases"),
        "steps_planned": gate.get("steps_planned"),
        "steps_trained": gate.get("steps_trained"),
        "seqs_skipped": gate.get("seqs_skipped"),
        "estimate_s": est.get("total_seconds"),
        "estimate_phases": est.get("phases"),
        "estimate_steps": [est.get("steps_planned"), est.get("steps_expected"),
                           est.get("steps_trained")],
        "estimate_from": est.get("step_share_from"),
        "peak_rss_mb": cycle.get("peak_rss_mb"),
        "load_before": l0,
        "load_after": load(),
        "per_batch": per_batch,
        "correct": summary["correct"],
        "total": summary["total"],
        "retention_after": summary["retention_after"],
        "retention_lost": summary["retention_lost"],
    }
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(a.work, "capacity.json"), "w") as f:
        json.dump({"notes": a.notes, "cycle": a.cycle, "rows": rows}, f, indent=1)

if a.plot:
    plot({"rows": rows, "cycle": a.cycle}, a.plot)
