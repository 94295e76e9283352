# Sourced by bench-relay.sh, bench-metrics.sh and bench-scrape.sh.
# bench_binaries ROOT OUT NAME...: sets BIN to the folder of the binaries a run uses. With
# BENCH_BIN_DIR, that folder as it is (no cargo; for a machine without the toolchain).
# Otherwise a release build (skipped with BENCH_NO_BUILD=1) whose NAMEs are copied to OUT/bin:
# another session's build must not swap the binaries mid-run.
bench_binaries() {
  local root=$1 out=$2
  shift 2
  if [ -n "${BENCH_BIN_DIR:-}" ]; then
    BIN=$(cd "$BENCH_BIN_DIR" && pwd)
    return
  fi
  if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    (cd "$root" && cargo build --release -p iotunnel -p iotunnel-loadtest)
  fi
  BIN=$out/bin
  mkdir -p "$BIN"
  for b in "$@"; do
    cp "$root/target/release/$b" "$BIN/$b.new" && mv "$BIN/$b.new" "$BIN/$b"
  done
}
