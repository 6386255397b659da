#!/usr/bin/env bash
# The short fuzzing run of CI (issue 22): installs cargo-afl when it is missing, builds the five
# targets with AFL++'s instrumentation, fuzzes them all at once for SECONDS each from the seeds
# in seeds/, and fails when any target found a crash or a hang, printing each input's path and
# how to replay it. The long campaigns and their figures are in README.md.
#
# usage: fuzz/ci.sh [SECONDS]     (default 60; the five targets run side by side)
# Output goes to fuzz/out/ci/<target>/ (kept after the run, for the CI log's paths).
set -euo pipefail
cd "$(dirname "$0")"
SECS=${1:-60}
TARGETS=(gguf adapter notes train_data serve_request)
# The version whose runtime the targets are built and run with; 0.18.2 built and ran here.
CARGO_AFL_VERSION=0.18.2

t_start=$(date +%s)
if ! cargo afl --version >/dev/null 2>&1; then
  # AFL++'s runtime is built from source by `cargo afl config --build`: it needs make and a C
  # compiler, which the main build (bundled SQLite) already needs.
  if ! command -v make >/dev/null || ! command -v cc >/dev/null; then
    if [[ $(id -u) == 0 ]]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential
    else
      echo "fuzz/ci.sh: needs make and a C compiler (apt-get install build-essential)" >&2
      exit 2
    fi
  fi
  cargo install cargo-afl --locked --version "$CARGO_AFL_VERSION"
fi
# Builds AFL++'s runtime for this rustc; refused (and nothing to do) when it is already built.
if ! out=$(cargo afl config --build 2>&1); then
  grep -q "already built" <<<"$out" || { echo "$out" >&2; exit 1; }
fi
t_installed=$(date +%s)

cargo afl build --release --features afl
t_built=$(date +%s)
BIN=${CARGO_TARGET_DIR:-target}/release

# AFL++ on a CI machine: no CPU frequency governor to check, core dumps may go to a handler
# (crashes are still caught through the fork server), no free core to bind to on a shared
# machine, plain log lines instead of the screen. Running as root needs nothing more.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1 AFL_NO_UI=1
export AFL_FAST_CAL=1

OUT=out/ci
rm -rf "$OUT"
mkdir -p "$OUT"
pids=()
for t in "${TARGETS[@]}"; do
  # -t 10000: a hang is an input that takes over 10 s, far beyond any seed's time even on a
  # loaded machine; -V: stop after SECS seconds.
  cargo afl fuzz -i "seeds/$t" -o "$OUT/$t" -V "$SECS" -t 10000 "$BIN/$t" >"$OUT/$t.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!TARGETS[@]}"; do
  t=${TARGETS[$i]}
  if ! wait "${pids[$i]}"; then
    echo "fuzz $t: afl-fuzz failed; the end of $OUT/$t.log:" >&2
    tail -n 20 "$OUT/$t.log" >&2
    failed=1
  fi
done

for t in "${TARGETS[@]}"; do
  stats=$OUT/$t/default/fuzzer_stats
  if [[ -f $stats ]]; then
    get() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
    echo "fuzz $t: $(get execs_done) executions, $(get execs_per_sec) execs/s, corpus $(get corpus_count), crashes $(get saved_crashes), hangs $(get saved_hangs)"
  fi
  for kind in crashes hangs; do
    for f in "$OUT/$t/default/$kind"/id:*; do
      [[ -e $f ]] || continue
      echo "FUZZ $kind: $t: $(realpath "$f")" >&2
      echo "  replay: cd fuzz && cargo build --release && target/release/$t '$(realpath "$f")'" >&2
      failed=1
    done
  done
done
t_end=$(date +%s)
echo "fuzz: install $((t_installed - t_start)) s, build $((t_built - t_installed)) s, fuzzing $((t_end - t_built)) s"
if [[ $failed != 0 ]]; then
  echo "fuzz: FAILED (crashes or hangs above; each becomes a regression test in the main crate)" >&2
  exit 1
fi
echo "fuzz: no crash, no hang"
