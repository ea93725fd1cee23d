# What `cargo xtask test --kernel 5.10` runs inside the VM (bash, as root, from the project's
# root): a kernel older than the agent needs. The probes must name what is missing and the
# version that brought it, `dataplane run` must refuse (exit 5) before it changes anything
# (no pins, no nftables table, no cgroup hook), and Docker keeps serving the published
# port on its own.
set -euo pipefail
BIN=target/release
step() { echo "refuse: $*"; }
fail() { echo "refuse: FAILED: $*"; exit 1; }

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mkdir -p /run/dataplane

rc=0
$BIN/dataplane features >/tmp/vm-features.txt 2>&1 || rc=$?
cat /tmp/vm-features.txt
[ "$rc" -eq 5 ] || fail "dataplane features exited $rc, not 5"
grep -q "^missing   SO_NETNS_COOKIE (needs Linux 5.14)" /tmp/vm-features.txt \
    || fail "SO_NETNS_COOKIE is not listed as missing"
grep -q "^degraded  bpf_set_retval (needs Linux 5.18)" /tmp/vm-features.txt \
    || fail "bpf_set_retval is not listed as degraded"
step "the probes name what this kernel lacks"

rc=0
timeout 60 $BIN/dataplane run >/tmp/vm-agent.log 2>&1 || rc=$?
tail -n 5 /tmp/vm-agent.log
[ "$rc" -eq 5 ] || fail "dataplane run exited $rc, not 5"
grep -q "lacks what the agent needs: SO_NETNS_COOKIE (Linux 5.14" /tmp/vm-agent.log \
    || fail "the refusal does not name SO_NETNS_COOKIE and Linux 5.14"
[ ! -e /sys/fs/bpf/dataplane ] || fail "a pin directory was left: $(ls /sys/fs/bpf/dataplane)"
if nft list table inet dataplane >/dev/null 2>&1; then fail "the nftables table was created"; fi
step "dataplane run refused (exit 5) and changed nothing"
