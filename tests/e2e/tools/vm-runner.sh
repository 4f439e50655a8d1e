#!/bin/sh
# A cargo runner that runs the binary (a test binary, usually) inside the kernel VM:
#   CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/tests/e2e/tools/vm-runner.sh cargo test ...
# Exit code as the binary's; 124 on a timeout (WGMESH_VM_TIMEOUT seconds, default 900), 125
# when the VM gave none. The VM itself is `cargo xtask vm run` (tests/e2e/src/vm).
set -eu
here=$(dirname "$(realpath "$0")")
# The xtask binary must not itself run through this runner.
unset CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER
exec cargo run --quiet --manifest-path "$here/../../../Cargo.toml" --package xtask -- \
  vm run --timeout "${WGMESH_VM_TIMEOUT:-900}" "$@"
