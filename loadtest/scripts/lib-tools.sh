# shellcheck shell=bash
# Sourced by bench-e2e.sh: finds the outside tools the end-to-end comparison runs, and installs
# the missing ones unless BENCH_INSTALL=0: iperf3 (apt), rathole 0.5.0 and bore 0.6.0 (cargo
# install, each under its own root in $BENCH_TOOLS, default /work/scratch/e2e: nothing committed).
# Sets IPERF3, RATHOLE and BORE; an environment variable of the same name wins, then the tool on
# PATH, then the one under $BENCH_TOOLS.
#
# By hand, the same as the script does:
#   apt-get install -y iperf3
#   export CARGO_TARGET_DIR=/var/tmp/cargo-install-target
#   cargo install rathole --version 0.5.0 --root /work/scratch/e2e/rathole
#   cargo install bore-cli --version 0.6.0 --locked --root /work/scratch/e2e/bore
# rathole's own lock file pins `time` 0.3.29, which no longer builds (E0282 with rustc 1.95), so
# `--locked` fails for it; each install tries --locked first and then goes without.
TOOLS=${BENCH_TOOLS:-/work/scratch/e2e}
# The versions the table was measured with.
RATHOLE_VERSION=0.5.0
BORE_VERSION=0.6.0

# tool_path NAME: NAME on PATH, else its cargo-install root under $TOOLS.
tool_path() { command -v "$1" || echo "$TOOLS/$1/bin/$1"; }

# cargo_tool CRATE VERSION ROOT: a locked install first (the crate's own lock file), then
# unlocked if that fails (an old lock can name a yanked or unbuildable version).
cargo_tool() {
  local target=${BENCH_INSTALL_TARGET:-/var/tmp/cargo-install-target}
  CARGO_TARGET_DIR=$target nice cargo install "$1" --version "$2" --locked --root "$3" ||
    CARGO_TARGET_DIR=$target nice cargo install "$1" --version "$2" --root "$3"
}

# A tool that does not install leaves its paths to fail at set-up, which the script reports.
install_missing_tools() {
  if ! [ -x "$IPERF3" ]; then
    echo "installing iperf3 (apt)"
    apt-get install -y iperf3 >/dev/null || echo "!! could not install iperf3" >&2
    IPERF3=$(command -v iperf3 || echo "$IPERF3")
  fi
  if ! [ -x "$RATHOLE" ]; then
    echo "installing rathole $RATHOLE_VERSION under $TOOLS/rathole"
    cargo_tool rathole "$RATHOLE_VERSION" "$TOOLS/rathole" || echo "!! could not install rathole" >&2
    RATHOLE=$TOOLS/rathole/bin/rathole
  fi
  if ! [ -x "$BORE" ]; then
    echo "installing bore $BORE_VERSION under $TOOLS/bore"
    cargo_tool bore-cli "$BORE_VERSION" "$TOOLS/bore" || echo "!! could not install bore" >&2
    BORE=$TOOLS/bore/bin/bore
  fi
}

IPERF3=${IPERF3:-$(tool_path iperf3)}
RATHOLE=${RATHOLE:-$(tool_path rathole)}
BORE=${BORE:-$(tool_path bore)}
if [ "${BENCH_INSTALL:-1}" = 1 ]; then
  install_missing_tools
fi
