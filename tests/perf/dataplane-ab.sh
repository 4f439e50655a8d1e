#!/bin/bash
# Interleaved A/B of userspace-device binaries (root; see docs/performance.md, "Quick A/B runs"):
#   tests/perf/dataplane-ab.sh ROUNDS SECONDS BIN1 BIN2 ...   (copy each binary aside first)
# Env: WORKERS (default auto), PERF=1 (perf record both devices), LAT=1 (TCP 1-byte ping-pong).
# Prints per run: Gbit/s, retransmits, CPU s/GB of both devices (user, sys) and per thread.
set -u
ROUNDS=$1; SECS=$2; shift 2
W=${AB_DIR:-$PWD/target/ab}; mkdir -p $W
cleanup() {
  for p in $(cat $W/pids 2>/dev/null); do kill $p 2>/dev/null; done; sleep 0.3
  ip netns del dpab-a 2>/dev/null; ip netns del dpab-b 2>/dev/null; rm -f $W/pids
}
trap cleanup EXIT
threadcpu() { # pid -> lines "comm utime stime"
  for t in /proc/$1/task/*; do
    s=$(cat $t/stat 2>/dev/null) || continue
    comm=$(echo "$s" | sed 's/.*(\(.*\)).*/\1/'); rest=$(echo "$s" | sed 's/.*) //')
    set -- $rest; echo "$comm ${12} ${13}"
  done
}
for r in $(seq 1 $ROUNDS); do
 for bin in "$@"; do
  cleanup
  ip netns add dpab-a; ip netns add dpab-b
  ip link add dpva type veth peer name dpvb
  ip link set dpva netns dpab-a; ip link set dpvb netns dpab-b
  ip -n dpab-a addr add 10.210.0.1/24 dev dpva; ip -n dpab-b addr add 10.210.0.2/24 dev dpvb
  ip -n dpab-a link set dpva up; ip -n dpab-b link set dpvb up
  ip -n dpab-a link set lo up; ip -n dpab-b link set lo up
  rm -f /var/run/wireguard/dpt-a.sock /var/run/wireguard/dpt-b.sock
  WGMESH_LOG=warn ip netns exec dpab-a $bin userspace-device --interface dpt-a --workers ${WORKERS:-auto} >$W/a.log 2>&1 & PA=$!
  WGMESH_LOG=warn ip netns exec dpab-b $bin userspace-device --interface dpt-b --workers ${WORKERS:-auto} >$W/b.log 2>&1 & PB=$!
  echo "$PA $PB" > $W/pids
  for i in $(seq 50); do [ -S /var/run/wireguard/dpt-a.sock ] && [ -S /var/run/wireguard/dpt-b.sock ] && break; sleep 0.1; done
  ka=$(wg genkey); kb=$(wg genkey); pa=$(echo $ka | wg pubkey); pb=$(echo $kb | wg pubkey)
  ip netns exec dpab-a wg set dpt-a private-key <(echo $ka) listen-port 51900 peer $pb endpoint 10.210.0.2:51901 allowed-ips 10.211.0.2/32
  ip netns exec dpab-b wg set dpt-b private-key <(echo $kb) listen-port 51901 peer $pa endpoint 10.210.0.1:51900 allowed-ips 10.211.0.1/32
  ip -n dpab-a addr add 10.211.0.1/24 dev dpt-a; ip -n dpab-b addr add 10.211.0.2/24 dev dpt-b
  ip -n dpab-a link set dpt-a mtu 1420 up; ip -n dpab-b link set dpt-b mtu 1420 up
  ip netns exec dpab-b iperf3 -s -1 -p 5299 >/dev/null 2>&1 & SP=$!
  sleep 0.5
  sleep 0.5
  threadcpu $PA > $W/a0; threadcpu $PB > $W/b0
  if [ -n "${PERF:-}" ]; then (sleep 1; perf record -e cpu-clock -F 999 -g -o $W/perf-$(basename $bin)-$r.data -p $PA,$PB -- sleep $((SECS-2)) >/dev/null 2>&1) & PP=$!; fi
  ip netns exec dpab-a iperf3 -c 10.211.0.2 -p 5299 -t $SECS -J > $W/iperf.json 2>/dev/null
  [ -n "${PERF:-}" ] && wait $PP
  threadcpu $PA > $W/a1; threadcpu $PB > $W/b1
  wait $SP 2>/dev/null
  if [ -n "${LAT:-}" ]; then ip netns exec dpab-b python3 $(dirname $0)/pingpong.py s & LP=$!; sleep 0.3; echo "LAT $(basename $bin) $(ip netns exec dpab-a python3 $(dirname $0)/pingpong.py c 10.211.0.2)"; wait $LP; fi
  python3 - "$bin" $r <<'PY'
import json,sys
import os; W=os.environ.get('AB_DIR', os.getcwd()+'/target/ab')
j=json.load(open(W+'/iperf.json'))
b=j['end']['sum_received']['bytes']; bps=j['end']['sum_received']['bits_per_second']; rt=j['end']['sum_sent'].get('retransmits',0)
def rd(f):
    d={}
    for l in open(f):
        c,u,s=l.split(); d.setdefault(c,[0,0]); d[c][0]+=int(u); d[c][1]+=int(s)
    return d
out=[]; tot=0; tu=0; ts=0
for side in 'ab':
    x0=rd(f'{W}/{side}0'); x1=rd(f'{W}/{side}1')
    for c in sorted(x1):
        u=(x1[c][0]-x0.get(c,[0,0])[0])/100; s=(x1[c][1]-x0.get(c,[0,0])[1])/100
        if u+s>0.01: out.append(f'{side}:{c} u{u:.2f} s{s:.2f}')
        tot+=u+s; tu+=u; ts+=s
gb=b/1e9
print(f"R{sys.argv[2]} {sys.argv[1].split('/')[-1]:14s} {bps/1e9:5.2f} Gbit/s rtx {rt:5d} cpu {tot/gb:.3f} s/GB (user {tu/gb:.3f} sys {ts/gb:.3f}) | "+' '.join(f"{o}" for o in out), flush=True)
PY
  cleanup
 done
done
