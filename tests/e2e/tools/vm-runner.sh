#!/bin/sh
# A cargo runner that runs the binary (a test binary, usually) inside the kernel VM:
#   CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/tests/e2e/tools/vm-runner.sh cargo test ...
# Exit code as the binary's; 124 on a timeout (WGMESH_VM_TIMEOUT seconds, default 900), 125
# when the VM gave none. The VM itself is `cargo xtask vm run` (tests/e2e/src/vm).
set -eu
here=$(dirname "$(realpath "$0")")
# The xtask binary must not itself run through this runner.
unset CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER
# Nor see the variables cargo sets for the test binary: build scripts (ring's) watch some of
# them, and a different value rebuilds them and everything above them.
for v in $(env | sed -n 's/^\(CARGO_PKG_[A-Z_]*\|CARGO_MANIFEST_[A-Z_]*\|CARGO_CRATE_NAME\|CARGO_BIN_NAME\|CARGO_PRIMARY_PACKAGE\|CARGO_TARGET_TMPDIR\|OUT_DIR\)=.*/\1/p'); do
  unset "$v"
done
exec cargo run --quiet --manifest-path "$here/../../../Cargo.toml" --package xtask -- \
  vm run --timeout "${WGMESH_VM_TIMEOUT:-900}" "$@"
