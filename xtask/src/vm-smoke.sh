# The end-to-end smoke `cargo xtask test --kernel` runs inside the VM (bash, as root, from
# the project's root; the VM's filesystem is a copy-on-write view of the host's, so nothing
# here reaches the host). A Docker engine with its data root on the VM's tmpfs, the test
# image imported from the rootfs tar the host made, one published container, the agent;
# the container reached through 127.0.0.1, a host address and the bridge gateway, each
# connection translated (the agent's connect counter moves, no conntrack entry); then the
# agent restarted (SIGTERM: pins stay) and the same again.
set -euo pipefail
BIN=target/release
PORT=18080
step() { echo "smoke: $*"; }
fail() { echo "smoke: FAILED: $*"; echo "--- agent log"; tail -n 30 /tmp/vm-agent.log || true; exit 1; }

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mkdir -p /var/lib/docker /run/dataplane
mount -t tmpfs tmpfs /var/lib/docker
# A host address of the VM's own (it has no uplink): what a LAN address is on a host.
ip link add dpvm0 type dummy
ip addr add 192.0.2.10/24 dev dpvm0
ip link set dpvm0 up

step "starting dockerd (userland proxy off)"
dockerd --userland-proxy=false --pidfile /run/vm-dockerd.pid >/tmp/vm-dockerd.log 2>&1 &
until timeout 20 docker version >/dev/null 2>&1; do
    [ "$SECONDS" -lt 400 ] || break
    sleep 1
done
timeout 20 docker version >/dev/null 2>&1 || { tail -n 30 /tmp/vm-dockerd.log; fail "dockerd did not start"; }
docker version --format 'smoke: docker {{.Server.Version}}'
docker import target/vm/rootfs.tar dataplane-test:latest >/dev/null
docker run -d --name web -p $PORT:80 dataplane-test:latest httpd -f -p 80 -h /www >/dev/null
GW=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.Gateway}}{{end}}' web)

start_agent() {
    $BIN/dataplane run >>/tmp/vm-agent.log 2>&1 &
    echo $! >/run/vm-agent.pid
    for _ in $(seq 600); do $BIN/bridge-ctl status >/dev/null 2>&1 && return 0; sleep 0.2; done
    fail "the agent did not become ready"
}
connects() { $BIN/bridge-ctl --json status | python3 -c 'import json,sys; print(json.load(sys.stdin)["counters"].get("connect",0))'; }

check_paths() {
    for host in 127.0.0.1 192.0.2.10 "$GW"; do
        before=$(connects)
        body=$(curl -sS --max-time 20 "http://$host:$PORT/") || fail "curl $host:$PORT"
        case "$body" in *"dataplane test backend"*) ;; *) fail "$host:$PORT answered: $body" ;; esac
        after=$(connects)
        [ "$after" -gt "$before" ] || fail "$host:$PORT was not translated (connect counter $before -> $after)"
        step "$host:$PORT -> the container, translated"
    done
    tracked=$(conntrack -L -p tcp --dport 80 2>/dev/null | grep -c "dport=80 " || true)
    [ "$tracked" -eq 0 ] || fail "$tracked conntrack entries for translated connections"
}

step "starting the agent"
start_agent
$BIN/bridge-ctl status | sed -n '1,6p'
$BIN/bridge-ctl --json status | python3 -c '
import json, os, sys
s = json.load(sys.stdin)
assert s["kernel"] == os.uname().release, s["kernel"]
off = [f["name"] for f in s["features"] if f["state"] != "active"]
assert s["features"] and not off, off
print("smoke: kernel", s["kernel"], "with all", len(s["features"]), "features active")
' || fail "bridge-ctl status does not show this kernel with every feature active"
check_paths
stop_agent() {
    kill -TERM "$(cat /run/vm-agent.pid)"
    while kill -0 "$(cat /run/vm-agent.pid)" 2>/dev/null; do sleep 0.2; done
}
step "restarting the agent (SIGTERM, pins stay)"
stop_agent
start_agent
grep -q "reuse_pinned" <($BIN/bridge-ctl --json status) || fail "the restart did not take the pinned programs"
check_paths
stop_agent
$BIN/dataplane uninstall >/dev/null
docker rm -f web >/dev/null
kill "$(cat /run/vm-dockerd.pid)"
step "passed"
