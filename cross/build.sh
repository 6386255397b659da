#!/usr/bin/env bash
# Cross-compile hone for 64-bit and 32-bit ARM Linux (Raspberry Pi and similar boards) on an
# x86_64 Debian/Ubuntu machine.
#
#   cross/build.sh aarch64|armv7|all [--profile dist|release] [--toolchain auto|rustup|debian]
#                  [-- EXTRA CARGO BUILD ARGS]
#
# Targets:  aarch64 = aarch64-unknown-linux-gnu       (64-bit Raspberry Pi OS, Pi 3/4/5, most boards)
#           armv7   = armv7-unknown-linux-gnueabihf   (32-bit Raspberry Pi OS on Pi 2/3/4)
# Profile:  dist (default; Cargo.toml: fat LTO, 1 codegen unit, stripped, panic=abort) or release.
# Output:   target/cross/<triple>/<profile>/hone  (the path and size are printed at the end);
#           $CARGO_TARGET_DIR/cross/... when CARGO_TARGET_DIR is set; HONE_CROSS_TARGET_DIR
#           replaces the whole target/cross part.
#
# Which Rust toolchain builds it (--toolchain, or HONE_CROSS_TOOLCHAIN; default auto):
#   rustup  the rustup toolchain, if `rustup target list --installed` has the target or
#           `rustup target add` works (it needs network access to rustup's server);
#   debian  Debian 12's own Rust (packages rustc-web, cargo-web and libstd-rust-web-dev:<arch>,
#           which carries the standard library for the ARM target), run as /usr/bin/cargo with
#           RUSTC=/usr/bin/rustc;
#   auto    rustup if it has or can add the target, else debian.
# Either way the C cross compiler comes from Debian (gcc-aarch64-linux-gnu / gcc-arm-linux-gnueabihf
# plus the matching libc6-dev-*-cross); it links hone and compiles the bundled SQLite (the cc crate
# reads CC_<triple> and AR_<triple>, which this script sets). Missing Debian packages are installed
# when running as root; otherwise the script prints the exact apt command and stops.
#
# Idempotent: a second run only re-runs cargo, which rebuilds nothing that is up to date. It uses its
# own target directory, so it never invalidates the native build in target/release.
set -euo pipefail

die() { echo "cross/build.sh: error: $*" >&2; exit 1; }
note() { echo "cross/build.sh: $*" >&2; }

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

WHAT=""
PROFILE="dist"
TOOLCHAIN="${HONE_CROSS_TOOLCHAIN:-auto}"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    aarch64 | arm64 | aarch64-unknown-linux-gnu) WHAT="${WHAT:+$WHAT }aarch64" ;;
    armv7 | armhf | armv7-unknown-linux-gnueabihf) WHAT="${WHAT:+$WHAT }armv7" ;;
    all) WHAT="aarch64 armv7" ;;
    --profile) [[ $# -ge 2 ]] || die "--profile needs a value (dist or release)"; PROFILE="$2"; shift ;;
    --profile=*) PROFILE="${1#--profile=}" ;;
    --release) PROFILE="release" ;;
    --toolchain) [[ $# -ge 2 ]] || die "--toolchain needs a value (auto, rustup or debian)"; TOOLCHAIN="$2"; shift ;;
    --toolchain=*) TOOLCHAIN="${1#--toolchain=}" ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
  shift
done
[[ -n "$WHAT" ]] || { usage >&2; die "say which target to build: aarch64, armv7 or all"; }
case "$PROFILE" in dist | release) ;; *) die "--profile must be dist or release, not '$PROFILE'" ;; esac
case "$TOOLCHAIN" in auto | rustup | debian) ;; *) die "--toolchain must be auto, rustup or debian, not '$TOOLCHAIN'" ;; esac
[[ "$(uname -s)" == Linux ]] || die "this script runs on Linux (it uses Debian's cross compilers); on macOS see cross/README.md"
command -v dpkg >/dev/null || die "this script needs a Debian-based host (dpkg/apt) for the C cross compilers; or use cross-rs with Cross.toml (see cross/README.md)"

# Beside the native build: $CARGO_TARGET_DIR/cross when that is set, else target/cross.
TARGET_DIR="${HONE_CROSS_TARGET_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/cross}"
IS_ROOT=0
[[ "$(id -u)" == 0 ]] && IS_ROOT=1

# --- per-target facts --------------------------------------------------------------------------
triple_of() { case "$1" in aarch64) echo aarch64-unknown-linux-gnu ;; armv7) echo armv7-unknown-linux-gnueabihf ;; esac; }
debarch_of() { case "$1" in aarch64) echo arm64 ;; armv7) echo armhf ;; esac; }
gnu_of() { case "$1" in aarch64) echo aarch64-linux-gnu ;; armv7) echo arm-linux-gnueabihf ;; esac; }
qemu_of() { case "$1" in aarch64) echo qemu-aarch64-static ;; armv7) echo qemu-arm-static ;; esac; }
c_pkgs_of() { case "$1" in
  aarch64) echo "gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
  armv7) echo "gcc-arm-linux-gnueabihf libc6-dev-armhf-cross" ;;
esac; }

pkg_installed() { # NAME[:ARCH] [VERSION]
  local v
  v="$(dpkg-query -W -f='${db:Status-Abbrev}|${Version}' "$1" 2>/dev/null)" || return 1
  [[ "$v" == ii* ]] || return 1
  [[ -z "${2:-}" || "${v#*|}" == "$2" ]]
}

APT_UPDATED=0
apt_install() { # PACKAGE... (NAME, NAME:ARCH or NAME:ARCH=VERSION)
  local cmd="apt-get update && apt-get install -y $*"
  if [[ $IS_ROOT != 1 ]]; then
    die "missing Debian packages; install them as root, then run this script again:
    $( for a in "${ADD_ARCHS[@]:-}"; do [[ -n "$a" ]] && printf 'sudo dpkg --add-architecture %s && ' "$a"; done )sudo sh -c '$cmd'"
  fi
  command -v apt-get >/dev/null || die "no apt-get here; install these packages by hand: $*"
  local a added=()
  for a in "${ADD_ARCHS[@]:-}"; do
    [[ -z "$a" ]] && continue
    if ! dpkg --print-foreign-architectures | grep -qx "$a"; then
      note "dpkg --add-architecture $a"
      dpkg --add-architecture "$a"
      added+=("$a")
      APT_UPDATED=0
    fi
  done
  if [[ $APT_UPDATED == 0 ]]; then
    note "apt-get update"
    # A mirror in the middle of a sync makes `apt-get update` fail for one index; go on with what
    # was fetched and let apt-get install say if a package is really missing.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq || note "warning: apt-get update reported errors (see above); trying the install anyway"
    APT_UPDATED=1
  fi
  note "apt-get install -y $*"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; then
    # Leave dpkg as it was: a foreign architecture whose index cannot be fetched makes every later
    # `apt-get update` on this machine fail.
    for a in "${added[@]:-}"; do
      [[ -n "$a" ]] && dpkg --remove-architecture "$a" 2>/dev/null && note "removed the architecture $a again"
    done
    die "apt-get install failed for: $*
  (if apt says a version was not found for a foreign architecture, Debian's mirror may be mid-sync:
   wait a few minutes and run this script again, or use --toolchain rustup where rustup has network)"
  fi
}

# --- toolchain choice ----------------------------------------------------------------------------
rustup_has() { command -v rustup >/dev/null && rustup target list --installed 2>/dev/null | grep -qx "$1"; }

choose_toolchain() { # TARGET -> prints rustup|debian
  local t="$1" triple
  triple="$(triple_of "$t")"
  case "$TOOLCHAIN" in
    rustup)
      command -v rustup >/dev/null || die "--toolchain rustup, but rustup is not installed"
      if ! rustup_has "$triple"; then
        note "rustup target add $triple"
        rustup target add "$triple" >&2 || die "rustup target add $triple failed (no network to rustup's server?); try --toolchain debian"
      fi
      echo rustup ;;
    debian) echo debian ;;
    auto)
      if rustup_has "$triple"; then echo rustup; return; fi
      if command -v rustup >/dev/null; then
        note "rustup has no $triple; trying \`rustup target add $triple\` (120 s at most)"
        if timeout 120 rustup target add "$triple" >&2 && rustup_has "$triple"; then echo rustup; return; fi
        note "rustup could not add $triple; using Debian's Rust toolchain instead"
      fi
      echo debian ;;
  esac
}

# Make sure the Debian packages this target needs are there (installing them as root).
ensure_packages() { # TARGET TOOLCHAIN
  local t="$1" tc="$2" arch pkgs=() p ver
  arch="$(debarch_of "$t")"
  ADD_ARCHS=()
  for p in $(c_pkgs_of "$t"); do pkg_installed "$p" || pkgs+=("$p"); done
  if [[ "$tc" == debian ]]; then
    # libstd-rust-web-dev is Multi-Arch: same, so the ARM standard library must be exactly the
    # version of the installed rustc-web; pin it so apt cannot pick a mismatched one.
    if pkg_installed rustc-web; then
      ver="$(dpkg-query -W -f='${Version}' rustc-web)"
      pkg_installed cargo-web || pkgs+=("cargo-web=$ver")
    else
      command -v apt-cache >/dev/null || die "no apt-cache here"
      ver="$(apt-cache policy rustc-web 2>/dev/null | awk '/Candidate:/ {print $2}')"
      if [[ -z "$ver" || "$ver" == "(none)" ]]; then
        [[ $IS_ROOT == 1 ]] && { DEBIAN_FRONTEND=noninteractive apt-get update -qq || true; APT_UPDATED=1; }
        ver="$(apt-cache policy rustc-web 2>/dev/null | awk '/Candidate:/ {print $2}')"
      fi
      [[ -n "$ver" && "$ver" != "(none)" ]] || die "Debian has no rustc-web package here (Debian 12 'bookworm' with bookworm-security has it); use rustup instead"
      pkgs+=("rustc-web=$ver" "cargo-web=$ver")
    fi
    if ! pkg_installed "libstd-rust-web-dev:$arch" "$ver"; then
      pkgs+=("libstd-rust-web-dev:$arch=$ver")
      dpkg --print-foreign-architectures | grep -qx "$arch" || ADD_ARCHS+=("$arch")
    fi
  fi
  if [[ ${#pkgs[@]} -gt 0 ]]; then apt_install "${pkgs[@]}"; fi
  return 0
}

# --- build -----------------------------------------------------------------------------------------
SUMMARY=()
for t in $WHAT; do
  triple="$(triple_of "$t")"
  gnu="$(gnu_of "$t")"
  TRIPLE_UP="$(echo "$triple" | tr 'a-z-' 'A-Z_')"
  triple_us="${triple//-/_}"

  tc="$(choose_toolchain "$t")"
  ensure_packages "$t" "$tc"
  command -v "$gnu-gcc" >/dev/null || die "$gnu-gcc not found even after installing $(c_pkgs_of "$t")"

  env_args=(
    "CARGO_TARGET_${TRIPLE_UP}_LINKER=$gnu-gcc"
    "CC_${triple_us}=$gnu-gcc"
    "CXX_${triple_us}=$gnu-g++"
    "AR_${triple_us}=$gnu-ar"
    # lets `cargo run/test --target $triple` work if someone reuses this environment
    "CARGO_TARGET_${TRIPLE_UP}_RUNNER=$(qemu_of "$t") -L /usr/$gnu -E LD_LIBRARY_PATH=/usr/$gnu/lib"
    # libsqlite3-sys must build its bundled copy, never look for a system (x86) libsqlite3
    "PKG_CONFIG_ALLOW_CROSS=0"
  )
  if [[ "$tc" == rustup ]]; then
    cargo_cmd=(cargo)
    tc_desc="rustup ($(rustc -V 2>/dev/null || echo '?'))"
  else
    cargo_cmd=(/usr/bin/cargo)
    env_args+=("RUSTC=/usr/bin/rustc" "RUSTDOC=/usr/bin/rustdoc")
    # keep rustup's proxies out of the way of build scripts that call `rustc`
    env_args+=("PATH=/usr/bin:$PATH")
    tc_desc="debian ($(/usr/bin/rustc -V 2>/dev/null || echo '?'))"
    [[ -d "/usr/lib/rustlib/$triple/lib" ]] || die "Debian's standard library for $triple is not in /usr/lib/rustlib/$triple (package libstd-rust-web-dev:$(debarch_of "$t"))"
  fi

  note "building hone for $triple, profile $PROFILE, toolchain $tc_desc, into $TARGET_DIR"
  start=$(date +%s)
  env "${env_args[@]}" "${cargo_cmd[@]}" build --bin hone --target "$triple" \
    --profile "$PROFILE" --target-dir "$TARGET_DIR" ${EXTRA[@]+"${EXTRA[@]}"} \
    || die "cargo build for $triple failed (see the errors above)"
  secs=$(( $(date +%s) - start ))

  bin="$TARGET_DIR/$triple/$PROFILE/hone"
  [[ -x "$bin" ]] || die "cargo reported success but $bin is missing"
  size=$(stat -c %s "$bin")
  SUMMARY+=("$(printf '%-31s %-7s %10d bytes (%5.1f MiB)  %4ds  %s' "$triple" "$PROFILE" "$size" \
    "$(awk "BEGIN {print $size/1048576}")" "$secs" "${bin#"$ROOT"/}")")
  if command -v file >/dev/null; then note "$(file -b "$bin" | cut -d, -f1-2)"; fi
done

echo
echo "hone cross builds (target, profile, size, build wall time, path):"
printf '  %s\n' "${SUMMARY[@]}"
echo "Copy a binary to the board, e.g. \`scp ${bin#"$ROOT"/} pi@raspberrypi.local:\`; see cross/README.md."
