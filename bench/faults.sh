#!/usr/bin/env bash
# Fault injection: SIGKILLs at random points of `hone note import`, `hone train`, `hone learn` and
# the daemon (`hone daemon run`, learning a new note each time), and a full disk (a file-size
# limit, `ulimit -f`, with SIGXFSZ ignored so writes fail with EFBIG as on a full disk). After
# every fault it checks that:
#   - the database passes `PRAGMA integrity_check`;
#   - no note is lost (imports are all-or-nothing: the count is the old one or old + all);
#   - no adapter is lost or damaged (every recorded version's file exists and matches the sha256
#     recorded when it was saved);
#   - a killed daemon released its lock (`daemon status` says not running, and the next daemon
#     starts instead of refusing with "already running");
# and at the end that training resumes from its checkpoint and finishes, learning finishes, and a
# daemon started after the kills finishes a cycle and leaves no note pending.
#
# usage: bench/faults.sh [KILLS] [HONE_BINARY]
#   KILLS   rounds per command, four commands (default 10; CI runs 3, under a minute). Kills of
#           an import or a resumed train that already ended are not counted: 40 rounds gave
#           130 SIGKILLs and 0 failures in 293 s here (BENCHMARKS.md, issue 22), 25 gave 94.
#   HONE    default target/release/hone (build it first: cargo build --release)
# It runs on a tiny random model written by `hone dev write-tiny-model`, so a run is fast; set
# FAULTS_MODEL=/path/to/model.gguf to use a real model instead (slower, same checks).
set -euo pipefail

KILLS=${1:-10}
HONE=${2:-target/release/hone}
[[ -x $HONE ]] || { echo "faults: $HONE is not built (cargo build --release)" >&2; exit 2; }
HONE=$(realpath "$HONE")
command -v python3 >/dev/null || { echo "faults: needs python3 (sqlite3, hashlib)" >&2; exit 2; }
WORK=$(mktemp -d -t hone-faults-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export HONE_HOME=$WORK/home
unset HONE_MODEL HONE_LOG
MODEL=${FAULTS_MODEL:-$WORK/tiny.gguf}
[[ -n ${FAULTS_MODEL:-} ]] || "$HONE" dev write-tiny-model "$MODEL" >/dev/null
H=("$HONE" -t 1 --model "$MODEL")
fails=0
kills=0

fail() { echo "FAIL: $*" >&2; fails=$((fails + 1)); }

# Sleeps $1 milliseconds inside bash (a read that times out on a pipe nobody writes): starting
# `sleep` takes longer than a whole note import on a loaded machine, so kills meant to land
# inside an import landed after it.
exec {NAP_FD}<> <(:)
nap() {
  local t
  printf -v t '%d.%03d' $(($1 / 1000)) $(($1 % 1000))
  read -rt "$t" -u "$NAP_FD" || true
}

# Prints "notes adapters" after checking integrity and every adapter file; fails loudly.
check() {
  python3 - "$HONE_HOME" <<'EOF'
import hashlib, os, sqlite3, sys
home = sys.argv[1]
db = sqlite3.connect(os.path.join(home, "hone.db"))
ok = db.execute("PRAGMA integrity_check").fetchone()[0]
if ok != "ok":
    print(f"integrity_check: {ok}", file=sys.stderr); sys.exit(1)
notes = db.execute("SELECT count(*) FROM notes").fetchone()[0]
rows = db.execute("SELECT version, file, sha256 FROM adapters").fetchall()
for v, f, sha in rows:
    p = os.path.join(home, f)
    if not os.path.exists(p):
        print(f"adapter v{v}: {f} is missing", file=sys.stderr); sys.exit(1)
    if sha and hashlib.sha256(open(p, "rb").read()).hexdigest() != sha:
        print(f"adapter v{v}: {f} does not match its sha256", file=sys.stderr); sys.exit(1)
print(notes, len(rows))
EOF
}

# Runs "$@" in the background and SIGKILLs it after a random 0-$2 seconds (if still running).
kill_randomly() {
  local max_ms=$1; shift
  "$@" >/dev/null 2>&1 &
  local pid=$!
  nap $((RANDOM % max_ms))
  kill -KILL "$pid" 2>/dev/null || true
  killed "$pid" && kills=$((kills + 1))
  return 0
}

# Reaps $1; true when SIGKILL ended it (status 137), false when it had ended by itself first.
killed() {
  local rc=0
  wait "$1" 2>/dev/null || rc=$?
  [[ $rc == 137 ]]
}

"${H[@]}" note list >/dev/null   # creates the database
read -r notes0 adapters0 < <(check)

# --- note import: all or nothing ----------------------------------------------------------------
mkdir -p "$WORK/notes"
for i in $(seq 1 300); do
  printf '# Note %d\n\nThe locker number %d holds the %s umbrella, filed on day %d.\n' \
    "$i" "$i" "$(shuf -n1 -e red green blue grey)" "$((RANDOM % 365))" >"$WORK/notes/n$i.md"
done
# An import takes about 60 ms here: kill within the time a whole import takes in a spare data
# directory, so the kills land inside it rather than after it.
t0=$(date +%s%N)
HONE_HOME=$WORK/probe-home "${H[@]}" note import "$WORK/notes" >/dev/null
import_ms=$(( ($(date +%s%N) - t0) / 1000000 + 1 ))
for _ in $(seq 1 "$KILLS"); do
  read -r before _ < <(check) || fail "check before import"
  kill_randomly "$import_ms" "${H[@]}" note import "$WORK/notes"
  if read -r after _ < <(check); then
    if [[ $after != "$before" && $after != $((before + 300)) ]]; then
      fail "note import killed: $before -> $after notes (expected all or nothing)"
    fi
  else
    fail "check after a killed import"
  fi
done
k_import=$kills
"${H[@]}" note import "$WORK/notes" >/dev/null || fail "the import after the kills"
read -r notes_imported _ < <(check)
[[ $notes_imported == 300 ]] || fail "after the kills and one full import: $notes_imported notes, expected 300"

# --- train: killed at random steps, then resumed -------------------------------------------------
python3 -c 'import json
for i in range(40): print(json.dumps({"text": f"Entry {i}: the heron waits in the shallow water until fish number {i} comes near."}))' >"$WORK/train.jsonl"
TRAIN=(train --data "$WORK/train.jsonl" --max-steps 200 --save-every 2 --seq-len 64)
for _ in $(seq 1 "$KILLS"); do
  kill_randomly 1500 "${H[@]}" "${TRAIN[@]}"
  read -r _ a < <(check) || fail "check after a killed train"
  [[ $a -ge $adapters0 ]] || fail "adapters lost: $a < $adapters0"
done
k_train=$((kills - k_import))
out=$("${H[@]}" "${TRAIN[@]}" 2>&1) || fail "the train after the kills: $out"
read -r _ adapters1 < <(check)
[[ $adapters1 -ge $((adapters0 + 1)) ]] || fail "no adapter saved after resuming ($adapters1)"
grep -q "resuming" <<<"$out" && echo "train resumed from its checkpoint" || echo "train finished without a checkpoint to resume (killed after the last save)"

# --- learn: a learning cycle killed at random points, then finished -------------------------------
for i in 1 2 3; do "${H[@]}" note add "Fact $i: the spare key number $i is under the flowerpot $i." >/dev/null; done
for _ in $(seq 1 "$KILLS"); do
  read -r before a_before < <(check) || fail "check before learn"
  kill_randomly 2000 "${H[@]}" learn --min-steps 200
  read -r after a_after < <(check) || fail "check after a killed learn"
  [[ $after == "$before" ]] || fail "learn killed: notes $before -> $after"
  [[ $a_after -ge $a_before ]] || fail "learn killed: adapters $a_before -> $a_after"
done
k_learn=$((kills - k_import - k_train))
"${H[@]}" learn --min-steps 200 >/dev/null 2>&1 || fail "the learn after the kills"
check >/dev/null || fail "check after learning"

# --- the daemon: killed at random points while it learns, then a cycle finished -----------------
# Hidden test flags (as in tests/daemon.rs): no idle threshold, and the machine's load, power,
# temperature and the time limits do not count, so it learns at once.
DAEMON=(daemon run --ignore-idle --ignore-condition
  cpu_load,power,battery,temperature,memory,window,daily_limit,session_limit --check-every-ms 100)
# The phase the status file shows for daemon pid $1 ("none" when that daemon wrote none yet).
phase() {
  python3 -c 'import json,sys
try: s = json.load(open(sys.argv[1]))
except Exception: s = {}
print(s.get("phase", "none") if str(s.get("pid")) == sys.argv[2] else "none")' \
    "$HONE_HOME/daemon.status.json" "$1"
}
daemon_json() {
  "${H[@]}" daemon status --json 2>/dev/null | python3 -c 'import json,sys
j = json.load(sys.stdin); print(str(j["running"]).lower(), j["pending_notes"])'
}
daemon_kills=0 learning_kills=0
# Its own data directory, so the notes it must learn are only the ones added here.
MAIN_HOME=$HONE_HOME
export HONE_HOME=$WORK/daemon-home
"${H[@]}" note list >/dev/null
for k in $(seq 1 "$KILLS"); do
  "${H[@]}" note add "Daemon fact $k: parcel $k waits at the kiosk on platform $((k % 7 + 1))." >/dev/null
  read -r before a_before < <(check) || fail "check before the daemon"
  "${H[@]}" "${DAEMON[@]}" >/dev/null 2>"$WORK/daemon.err" &
  pid=$!
  nap $((RANDOM % 4000))
  ph=$(phase "$pid")
  kill -KILL "$pid" 2>/dev/null || true
  if killed "$pid"; then
    kills=$((kills + 1)) daemon_kills=$((daemon_kills + 1))
    case $ph in learning* | self_edits | anchors | training | gate | pausing) learning_kills=$((learning_kills + 1)) ;; esac
  else
    fail "the daemon ended before its kill: $(tail -c 300 "$WORK/daemon.err")"
  fi
  grep -q "already running" "$WORK/daemon.err" && fail "daemon $k refused: the killed one's lock was not released"
  grep -q panicked "$WORK/daemon.err" && fail "daemon $k panicked: $(grep -m1 panicked "$WORK/daemon.err")"
  read -r after a_after < <(check) || fail "check after a killed daemon"
  [[ $after == "$before" ]] || fail "daemon killed: notes $before -> $after"
  [[ $a_after -ge $a_before ]] || fail "daemon killed: adapters $a_before -> $a_after"
  read -r running _ < <(daemon_json) || fail "daemon status after a kill"
  [[ $running == false ]] || fail "daemon status says a killed daemon still runs"
done
# A daemon after the kills takes the lock, finishes a cycle and learns every pending note (or,
# when the last killed daemon finished its cycle before the kill landed, finds none pending).
"${H[@]}" "${DAEMON[@]}" >/dev/null 2>"$WORK/daemon.err" &
pid=$!
status_says() {
  python3 -c 'import json,sys
try: s = json.load(open(sys.argv[1]))
except Exception: sys.exit(1)
print(s.get("pid"), s.get("phase"), (s.get("last_result") or {}).get("outcome", "none"))' \
    "$HONE_HOME/daemon.status.json"
}
done_cycle=
for _ in $(seq 1 600); do   # 2 minutes at most
  sleep 0.2
  kill -0 "$pid" 2>/dev/null || break
  read -r spid sphase outcome < <(status_says) || continue
  # Done: it finished a cycle, or (when a killed daemon had finished the last cycle just
  # before its kill landed) it found nothing left to learn; `pending` is checked below.
  if [[ $spid == "$pid" && $sphase == nothing_to_learn && ( $outcome == done || $outcome == none ) ]]; then
    done_cycle=1
    break
  fi
done
read -r running pending < <(daemon_json) || fail "daemon status with the last daemon running"
[[ $running == true ]] || fail "daemon status does not see the daemon after the kills"
if kill -TERM "$pid" 2>/dev/null; then
  wait "$pid" || fail "the daemon after the kills did not exit 0 on SIGTERM"
else
  wait "$pid" 2>/dev/null || true
fi
[[ -n $done_cycle && $pending == 0 ]] \
  || fail "the daemon after the kills finished no cycle leaving no note pending ($pending pending, $(phase "$pid")): $(tail -c 300 "$WORK/daemon.err")"
grep -q "already running" "$WORK/daemon.err" && fail "the daemon after the kills refused to start"
check >/dev/null || fail "check after the daemon"
echo "daemon: $daemon_kills SIGKILLs ($learning_kills while it learned), then a cycle finished with no note pending"
export HONE_HOME=$MAIN_HOME

# --- a full disk (file-size limit) ----------------------------------------------------------------
read -r notes_before adapters_before < <(check)
mkdir -p "$WORK/more"
for i in $(seq 1 50); do head -c 20000 /dev/urandom | base64 >"$WORK/more/m$i.txt"; done
( ulimit -f 256; trap '' XFSZ; "${H[@]}" note import "$WORK/more" ) >/dev/null 2>"$WORK/disk.err" \
  && echo "import under the limit succeeded" || echo "import on a full disk refused: $(tail -c 200 "$WORK/disk.err")"
grep -q panicked "$WORK/disk.err" && fail "panic on a full disk during import"
read -r notes_after _ < <(check) || fail "check after the full-disk import"
[[ $notes_after == "$notes_before" || $notes_after == $((notes_before + 50)) ]] \
  || fail "full-disk import: $notes_before -> $notes_after notes (not all or nothing)"
( ulimit -f 64; trap '' XFSZ; "${H[@]}" train --data "$WORK/train.jsonl" --max-steps 6 --save-every 1 --seq-len 64 --fresh ) \
  >/dev/null 2>"$WORK/disk-train.err" && echo "train under the limit finished" || echo "train on a full disk: $(tail -c 300 "$WORK/disk-train.err")"
grep -q panicked "$WORK/disk-train.err" && fail "panic on a full disk during training"
read -r _ adapters_after < <(check) || fail "check after the full-disk train"
[[ $adapters_after -ge $adapters_before ]] || fail "full-disk train lost adapters"

echo "faults: $kills SIGKILLs delivered (note import $k_import, train $k_train, learn $k_learn, daemon $daemon_kills), full disk on import and train; $fails failures"
[[ $fails == 0 ]]
