# The seed's layout, sourced by checks.sh after the dom0-backend checks:
# a netvm driver domain (driver_domain=1, xl devd, our hotplug script and
# qubes-setup-dnat-to-ns inside), two AppVMs behind it configured by
# qubes-setup-ip, an "outside" network namespace in dom0 reached only
# through the netvm, and qvm-dom0-network-via-netvm up/down.
# Uses check/note/elapsed/FAILED from checks.sh.
UPNET=198.51.100 UP=198.51.100.1 NGW=10.137.0.1
A1=10.137.0.20 A2=10.137.0.21 FORGED2=10.137.0.98
KEYS=$BIN/vif-route-qubes-keys
D0NET=$BIN/qvm-dom0-network-via-netvm
SETNET=$BIN/qvm-set-default-netvm
NLOG=/var/log/xen/console/guest-netvm.log
unset VIF_ROUTE_QUBES_DEBUG VIF_ROUTE_QUBES_FIREWALL
# the netvm's backend (VRQ_E2E_FIREWALL; unset or auto: nft, the image has
# it) and the other one, which a last AppVM a3 runs with (section "the
# other backend" below)
NFW=${NETVM_FIREWALL:-auto}; [ "$NFW" = auto ] && NFW=nft
if [ "$NFW" = nft ]; then OFW=iptables; else OFW=nft; fi
A3=10.137.0.22 FORGED3=10.137.0.97
# the flowtable proof (nft): a1's TCP flow to a sink upstream, and a1's
# packets from a forged source to the same port while it is offloaded
FPORT=7000 FORGEDF=10.137.0.95

# what is left of the dom0-backend part must not give dom0 a way out
ip link del dns0 2>/dev/null
modprobe bridge; modprobe veth

# ------------------------------------------------------- the outside world
ip link add upbr type bridge && ip link set upbr up   # no address in dom0
ip netns add up
ip link add up0 type veth peer name eth0 netns up
ip link set up0 master upbr up
ip -n up link set lo up
ip -n up addr add $UP/24 dev eth0
ip -n up link set eth0 up
ip -n up route add 10.137.0.0/24 via $UPNET.2   # the guests' range, routed (no NAT)
ip netns exec up python3 /e2e/dns_responder.py $UP >/tmp/updns.log 2>&1 &
ip netns exec up iptables -w -A INPUT -s $FORGED2 -p icmp -j ACCEPT
ip netns exec up iptables -w -A INPUT -s $A2 -p icmp -j ACCEPT
ip netns exec up iptables -w -A INPUT -s $FORGED3 -p icmp -j ACCEPT
ip netns exec up iptables -w -A INPUT -s $A3 -p icmp -j ACCEPT
ip netns exec up python3 /e2e/flow_sink.py $UP $FPORT >/tmp/upflow.log 2>&1 &
ip netns exec up iptables -w -A INPUT -s $FORGEDF -j ACCEPT
ip netns exec up iptables -w -A INPUT -s $A1 -p tcp --dport $FPORT -j ACCEPT
upcnt() { ip netns exec up iptables-save -c -t filter | grep -- "-A INPUT -s $1/32 -p icmp" | sed -n 's/^\[\([0-9]*\):.*/\1/p' | head -1; }
uprule() { ip netns exec up iptables-save -c -t filter | grep -F -- "$1 -j ACCEPT" | sed -n 's/^\[\([0-9]*\):.*/\1/p' | head -1; }

snap() {  # n: ask the netvm for a snapshot, into /tmp/snap-n
    xenstore-write /local/domain/$NID/e2e-req "$1"
    i=0
    while ! tr -d '\r' <$NLOG | grep -q "^NETVM SNAP $1 END" && [ $i -lt 90 ]; do sleep 1; i=$((i+1)); done
    tr -d '\r' <$NLOG | sed -n "s/^NETVM SNAP $1 //p" >/tmp/snap-$1
}
section() { sed -n "/^== $2\$/,/^== /p" /tmp/snap-$1 | grep -v '^== '; }
# snapshot n: the flowtable's devices (comma-separated), the accel chain's
# counter (packets that reached the forward hook), a1's flow in conntrack
flow_devices() { section $1 accel | sed -n 's/^[[:space:]]*devices = {\(.*\)}.*/\1/p' | tr -d ' "'; }
has_dev() { echo ",$(flow_devices $1)," | grep -qF ",$2,"; }
fwd_count() { section $1 accel | sed -n 's/.*counter packets \([0-9]*\) .*/\1/p' | head -1; }
flow_ct() { section $1 conntrack | grep -E "^tcp .*src=$A1 dst=$UP sport=$2 dport=$FPORT " | head -1; }
snap_guard() {  # n backend vif ip: the backend's guard of vif in snapshot n, none of the other's
    if [ "$2" = nft ]; then
        section $1 nft | grep -qF "\"$3\" . $4" || { echo "no \"$3\" . $4 in ip qubes allowed"; return 1; }
        section $1 iptables | grep -q -- "vrq-in-$3\b" && { echo "iptables chains for $3 too"; return 1; }
        echo "\"$3\" . $4 in ip qubes allowed, no iptables chain"
    else
        section $1 iptables | grep -q -- "-A vrq-in-$3 -s $4/32 -j RETURN" || { echo "no -A vrq-in-$3 -s $4/32 -j RETURN"; return 1; }
        section $1 nft | grep -q "table ip6\? qubes" && { echo "nft tables still loaded: $(section $1 nft | tr '\n' ' ' | head -c 400)"; return 1; }
        echo "vrq-in-$3 RETURNs $4, no nft table qubes"
    fi
}
state_part() { sed '/^== hotplug-log$/,$d' /tmp/snap-$1; }  # without the logs (they name past vifs)
wait_console() {  # domain pattern seconds
    i=0
    while ! tr -d '\r' </var/log/xen/console/guest-$1.log 2>/dev/null | grep -q "$2" && [ $i -lt $3 ]; do
        sleep 1; i=$((i+1)); done
    tr -d '\r' </var/log/xen/console/guest-$1.log 2>/dev/null | grep -q "$2"
}
state_of() { xl list "$1" 2>/dev/null | awk 'NR==2 {print $5}'; }
ticks() { tr -d '\r' </var/log/xen/console/guest-$1.log 2>/dev/null | grep -c "^GUEST TICK"; }
wait_connected() {  # frontend-domid
    i=0
    while [ "$(xenstore-read /local/domain/$NID/backend/vif/$1/0/hotplug-status 2>/dev/null)" != connected ] \
          && [ $i -lt 120 ]; do sleep 0.5; i=$((i+1)); done
    [ "$(xenstore-read /local/domain/$NID/backend/vif/$1/0/hotplug-status 2>/dev/null)" = connected ]
}

# ------------------------------------------------------- the netvm
cat >/tmp/netvm.cfg <<CFG
name = "netvm"
type = "pv"
kernel = "/e2e/vmlinux"
ramdisk = "/e2e/domu.cpio.zst"
extra = "console=hvc0 quiet rootfstype=ramfs rdinit=/vrq-netvm-init ${NETVM_FIREWALL:+e2e_firewall=$NETVM_FIREWALL}"
memory = 800
vcpus = 1
driver_domain = 1
on_crash = "destroy"
vif = [ 'script=vif-bridge,bridge=upbr,mac=00:16:3e:5e:ed:01' ]
CFG
if timeout 200 xl create -p /tmp/netvm.cfg >/tmp/xl-netvm.log 2>&1; then
    NID=$(xl domid netvm)
    $KEYS netvm netvm --gateway $NGW --dns1 $DNS1 --dns2 $DNS2 >/tmp/keys-netvm.log 2>&1 \
        || check netvm-keys-written FAIL "$(tr '\n' ' ' </tmp/keys-netvm.log)"
    perms=$(xenstore-ls -p /local/domain/$NID 2>&1 | grep '^qubes_netvm_gateway ')
    echo "$perms" | grep -q "(n0,r$NID)" && check netvm-keys-written PASS "$perms" \
        || check netvm-keys-written FAIL "perms: $perms"
    xl unpause netvm
    check netvm-create PASS "xl create -p + keys + unpause at +$(elapsed)s, domid $NID"
else
    check netvm-create FAIL "$(tail -c 800 /tmp/xl-netvm.log | tr '\n' ' ')"
    NID=none
fi
if wait_console netvm "^NETVM READY" 240; then
    note "netvm ready at +$(elapsed)s"
else
    check netvm-ready FAIL "no NETVM READY: $(tail -c 1500 $NLOG 2>&1 | tr '\n' ' ')"
fi
tr -d '\r' <$NLOG | sed -n 's/^NETVM CHECK \([^ ]*\) \(PASS\|FAIL\) \?\(.*\)$/\1 \2 \3/p' |
    while read -r n s d; do echo "E2E CHECK $n $s $d"; done
tr -d '\r' <$NLOG | grep -q "^NETVM CHECK .* FAIL" && FAILED=1
tr -d '\r' <$NLOG | grep -q "^NETVM CHECK" || FAILED=1

# ------------------------------------------------------- dom0 before up
if busybox ping -c 1 -W 2 $UP >/tmp/p0 2>&1; then
    check dom0-no-route-before-up FAIL "dom0 reached $UP: $(ip -4 route | tr '\n' ';')"
else
    check dom0-no-route-before-up PASS "dom0 cannot reach $UP ($(tail -1 /tmp/p0)); routes: $(ip -4 route | tr '\n' ';')"
fi

# ------------------------------------------------------- two AppVMs behind it
appvm_cfg() {  # name ip extra [vifspec]
    cat >/tmp/$1.cfg <<CFG
name = "$1"
type = "pv"
kernel = "/e2e/vmlinux"
ramdisk = "/e2e/domu.cpio.zst"
extra = "console=hvc0 quiet rootfstype=ramfs rdinit=/vrq-appvm-init e2e_name=$1 e2e_ip=$2 $3"
memory = 448
vcpus = 1
on_crash = "destroy"
vif = [ '${4:-backend=netvm,script=vif-route-qubes,ip=$2}' ]
CFG
}
appvm_cfg a1 $A1 "e2e_dns=resolv e2e_flow=$FPORT e2e_flowforged=$FORGEDF"
appvm_cfg a2 $A2 "e2e_dns=$DNS2 e2e_forged=$FORGED2"
for g in a1 a2; do
    if timeout 200 xl create -p /tmp/$g.cfg >/tmp/xl-$g.log 2>&1 && $KEYS guest $g >/tmp/keys-$g.log 2>&1 \
            && xl unpause $g; then
        check $g-create PASS "xl create -p, $(basename $KEYS) guest $g, unpause at +$(elapsed)s, domid $(xl domid $g)"
    else
        check $g-create FAIL "$(tail -c 600 /tmp/xl-$g.log /tmp/keys-$g.log | tr '\n' ' ')"
    fi
done
A1ID=$(xl domid a1 2>/dev/null); A2ID=$(xl domid a2 2>/dev/null)

# qvm-set-default-netvm refuses a domain that is not a driver domain (a1
# runs, but libxl made no /local/domain/A1ID/libxl for it) and one that does
# not exist, and leaves xl.conf alone
cp /etc/xen/xl.conf /tmp/xl.conf.before
$SETNET a1 >/tmp/setnet-a1.out 2>&1; rc1=$?
$SETNET nosuch >/tmp/setnet-nosuch.out 2>&1; rc2=$?
[ $rc1 = 1 ] && grep -q "not a driver domain" /tmp/setnet-a1.out && [ $rc2 = 1 ] \
    && grep -q "no domain named 'nosuch'" /tmp/setnet-nosuch.out && cmp -s /etc/xen/xl.conf /tmp/xl.conf.before \
    && check set-default-netvm-refuses PASS "$(tr '\n' ' ' </tmp/setnet-a1.out) / $(tr '\n' ' ' </tmp/setnet-nosuch.out)" \
    || check set-default-netvm-refuses FAIL "a1: exit $rc1 $(tr '\n' ' ' </tmp/setnet-a1.out); nosuch: exit $rc2 $(tr '\n' ' ' </tmp/setnet-nosuch.out)"
for g in a1 a2; do
    id=$(xl domid $g 2>/dev/null) || continue
    if wait_connected $id; then
        check $g-hotplug-in-netvm PASS "/local/domain/$NID/backend/vif/$id/0/hotplug-status=connected at +$(elapsed)s"
    else
        check $g-hotplug-in-netvm FAIL "hotplug-status='$(xenstore-read /local/domain/$NID/backend/vif/$id/0/hotplug-status 2>&1)' error='$(xenstore-read /local/domain/$NID/backend/vif/$id/0/hotplug-error 2>&1)'"
    fi
    p=$(xenstore-ls -p /local/domain/$id 2>&1 | grep '^qubes_ip ')
    echo "$p" | grep -q "(n0,r$id)" && check $g-keys-perms PASS "$p" || check $g-keys-perms FAIL "$p"
    grep -q "vif$id\.0" /var/log/xen/xen-hotplug.log 2>/dev/null \
        && check $g-no-script-in-dom0 FAIL "dom0's hotplug log names vif$id.0" \
        || check $g-no-script-in-dom0 PASS "dom0 ran no script for vif$id.0"
done

snap 1
r=$(section 1 routes)
miss=""
echo "$r" | grep -q "^$A1 dev vif$A1ID.0 .*metric $((32752 - A1ID))" || miss="$miss $A1/32-on-vif$A1ID.0"
echo "$r" | grep -q "^$A2 dev vif$A2ID.0 .*metric $((32752 - A2ID))" || miss="$miss $A2/32-on-vif$A2ID.0"
echo "$r" | grep -q "^$UPNET.0/24 dev eth0" || miss="$miss uplink-network"
echo "$r" | grep -q "^default via $UP dev eth0" || miss="$miss default"
section 1 records | grep -q "vif$A1ID.0.json" || miss="$miss record-vif$A1ID.0"
[ -z "$miss" ] && check netvm-routing-table PASS "$(echo "$r" | tr '\n' ';')" \
    || check netvm-routing-table FAIL "missing:$miss; routes: $(echo "$r" | tr '\n' ';'); $(tr '\n' ';' </tmp/snap-1 | tail -c 600)"

d1=$(snap_guard 1 $NFW vif$A1ID.0 $A1) && d2=$(snap_guard 1 $NFW vif$A2ID.0 $A2) \
    && check netvm-$NFW-guard PASS "a1: $d1; a2: $d2" || check netvm-$NFW-guard FAIL "$d1 $d2"
# the flowtable (table inet qubes-nat-accel, the nft backend's): after both
# onlines it covers both vifs and the uplink, which is in group 1
if [ "$NFW" = nft ]; then
    if section 1 records | grep -q flowtable-unsupported; then
        check netvm-flowtable-devices FAIL "the backend found no flowtable support in this kernel (marker flowtable-unsupported); modules: $(section 1 flow-modules | tr '\n' ' ')"
    elif has_dev 1 vif$A1ID.0 && has_dev 1 vif$A2ID.0 && has_dev 1 eth0 \
            && section 1 uplink | grep -q " group 1 " && section 1 accel | grep -q "flow add @qubes-accel"; then
        check netvm-flowtable-devices PASS "devices {$(flow_devices 1)}; $(section 1 accel | grep 'flow add' | sed 's/^[[:space:]]*//'); eth0 in group 1; modules: $(section 1 flow-modules | cut -d' ' -f1 | tr '\n' ' ')"
    else
        check netvm-flowtable-devices FAIL "devices {$(flow_devices 1)}, want vif$A1ID.0 vif$A2ID.0 eth0; uplink: $(section 1 uplink | head -c 300); table: $(section 1 accel | tr '\n' ' ' | head -c 800)"
    fi
fi

for g in a1 a2; do
    if wait_console $g "^GUEST DONE" 240; then note "$g finished its checks at +$(elapsed)s"
    else check $g-finished FAIL "no GUEST DONE: $(tail -c 1200 /var/log/xen/console/guest-$g.log 2>&1 | tr '\n' ' ')"; fi
    tr -d '\r' </var/log/xen/console/guest-$g.log 2>/dev/null |
        sed -n 's/^GUEST CHECK \([^ ]*\) \(PASS\|FAIL\) \?\(.*\)$/\1 \2 \3/p' |
        while read -r n s d; do echo "E2E CHECK appvm-$n $s $d"; done
    tr -d '\r' </var/log/xen/console/guest-$g.log 2>/dev/null | grep -q "^GUEST CHECK .* FAIL" && FAILED=1
    tr -d '\r' </var/log/xen/console/guest-$g.log 2>/dev/null | grep -q "^GUEST CHECK" || FAILED=1
done
q=$(grep -c "query from 10.137.0.2[01] " /tmp/updns.log)
grep -q "query from $A1 " /tmp/updns.log && grep -q "query from $A2 " /tmp/updns.log \
    && check appvm-dns-upstream PASS "$q queries from $A1 and $A2 reached the resolver at $UP" \
    || check appvm-dns-upstream FAIL "resolver log: $(tr '\n' ' ' </tmp/updns.log)"
forged=$(upcnt $FORGED2); genuine=$(upcnt $A2)
[ "${forged:-x}" = 0 ] && [ "${genuine:-0}" -gt 0 ] \
    && check appvm-forged-dropped-in-netvm PASS "upstream saw 0 packets from $FORGED2, $genuine from $A2" \
    || check appvm-forged-dropped-in-netvm FAIL "upstream saw '$forged' from $FORGED2, '$genuine' from $A2"

# ------------------------------------------------------- up
xl pause a2   # the administrator's: must stay paused after down
cp /etc/resolv.conf /tmp/resolv.before 2>/dev/null || : >/tmp/resolv.before
t1=$(cut -d' ' -f1 /proc/uptime)
$D0NET up -v >/tmp/up.out 2>/tmp/up.err; rc=$?
t2=$(cut -d' ' -f1 /proc/uptime)
[ $rc = 0 ] && check dom0-up PASS "exit 0 in $(awk -v a=$t1 -v b=$t2 'BEGIN {printf "%.1f", b - a}')s: $(tr '\n' ' ' </tmp/up.out)" \
    || check dom0-up FAIL "exit $rc: $(tail -c 1200 /tmp/up.err | tr '\n' ' ')"
first=$(sed -n "s/.*right after attach: .*hotplug-status=\(.*\)$/\1/p" /tmp/up.err | head -1)
case "$first" in
    "''") check libxl-empty-hotplug-status PASS "right after xl network-attach: hotplug-status='' (libxl's guard against the driver-domain attach race)" ;;
    "'connected'") check libxl-empty-hotplug-status PASS "already connected when first read (inconclusive about the guard)" ;;
    *) check libxl-empty-hotplug-status FAIL "right after xl network-attach: hotplug-status=$first" ;;
esac
sa=$(state_of a1); sb=$(state_of a2)
echo "$sa" | grep -q p && echo "$sb" | grep -q p \
    && check appvms-paused-during-up PASS "a1 $sa, a2 $sb" || check appvms-paused-during-up FAIL "a1 '$sa', a2 '$sb'"
n1=$(ticks a1); sleep 3; n2=$(ticks a1)
[ "$n1" = "$n2" ] && check a1-no-ticks-while-paused PASS "$n1 ticks before and after 3 s" \
    || check a1-no-ticks-while-paused FAIL "$n1 -> $n2 ticks"
note "dom0 after up: $(ip -4 -o addr | awk '{print $2, $4}' | tr '\n' ';') routes: $(ip -4 route | tr '\n' ';')"
if busybox ping -c 2 -W 3 $UP >/tmp/p1 2>&1; then
    check dom0-reaches-upstream-after-up PASS "$(grep -m1 'bytes from' /tmp/p1)"
else
    check dom0-reaches-upstream-after-up FAIL "$(tr '\n' ' ' </tmp/p1)"
fi
if busybox nslookup e2e.example >/tmp/ns0 2>&1 && grep -q 192.0.2.123 /tmp/ns0; then
    check dom0-resolves-after-up PASS "e2e.example -> 192.0.2.123 via $(grep nameserver /etc/resolv.conf | tr '\n' ' ')"
else
    check dom0-resolves-after-up FAIL "$(tr '\n' ' ' </tmp/ns0); resolv.conf: $(tr '\n' ' ' </etc/resolv.conf)"
fi
$D0NET status >/tmp/status.out 2>&1
grep -q "a1 ($A1ID)" /tmp/status.out && ! grep -q "a2 ($A2ID)" /tmp/status.out \
    && check dom0-status PASS "$(tr '\n' ' ' </tmp/status.out)" || check dom0-status FAIL "$(tr '\n' ' ' </tmp/status.out)"
$D0NET up >/tmp/up2.out 2>&1 && grep -q "already attached" /tmp/up2.out \
    && check dom0-up-twice PASS "$(tr '\n' ' ' </tmp/up2.out)" || check dom0-up-twice FAIL "$(tr '\n' ' ' </tmp/up2.out)"
snap 2
section 2 routes | grep -q "^10.137.0.2 dev vif0.0" && check netvm-routes-dom0 PASS "$(section 2 routes | grep vif0.0)" \
    || check netvm-routes-dom0 FAIL "$(section 2 routes | tr '\n' ';')"

# ------------------------------------------------------- down
$D0NET down -v >/tmp/down.out 2>/tmp/down.err; rc=$?
[ $rc = 0 ] && check dom0-down PASS "$(tr '\n' ' ' </tmp/down.out)" \
    || check dom0-down FAIL "exit $rc: $(tail -c 1200 /tmp/down.err | tr '\n' ' ')"
if busybox ping -c 1 -W 2 $UP >/tmp/p2 2>&1; then
    check dom0-no-route-after-down FAIL "dom0 still reaches $UP: $(ip -4 route | tr '\n' ';')"
else
    check dom0-no-route-after-down PASS "dom0 cannot reach $UP; routes: $(ip -4 route | tr '\n' ';')"
fi
cmp -s /etc/resolv.conf /tmp/resolv.before && check dom0-resolv-restored PASS "/etc/resolv.conf as before up" \
    || check dom0-resolv-restored FAIL "$(tr '\n' ' ' </etc/resolv.conf)"
sa=$(state_of a1); sb=$(state_of a2)
! echo "$sa" | grep -q p && echo "$sb" | grep -q p \
    && check down-unpauses-only-its-own PASS "a1 $sa (running again), a2 $sb (paused before up, still paused)" \
    || check down-unpauses-only-its-own FAIL "a1 '$sa', a2 '$sb'"
n1=$(ticks a1); sleep 3; n2=$(ticks a1)
[ "$n2" -gt "$n1" ] && check a1-ticks-after-down PASS "$n1 -> $n2 ticks in 3 s" \
    || check a1-ticks-after-down FAIL "$n1 -> $n2 ticks"
$D0NET down >/tmp/down2.out 2>&1 && grep -q "nothing to do" /tmp/down2.out \
    && check dom0-down-twice PASS "$(tr '\n' ' ' </tmp/down2.out)" || check dom0-down-twice FAIL "$(tr '\n' ' ' </tmp/down2.out)"
snap 3
state_part 3 | grep -q "vif0\.0" && check netvm-clean-after-down FAIL "$(state_part 3 | grep 'vif0\.0' | tr '\n' ';')" \
    || check netvm-clean-after-down PASS "no route, neighbour, link, record or rule of vif0.0 in the netvm"
xl unpause a2

# ------------------------------------------------------- an offloaded flow (nft)
# a1 opens a TCP flow to the sink upstream and keeps it busy; the netvm's
# conntrack must show it [OFFLOAD]ed, its packets must keep arriving while
# the forward hook (the accel chain's counter) no longer sees them, and a
# forged source from a1 to the same port must still be dropped meanwhile;
# then xl destroy a1 with the flow alive (below)
if [ "$NFW" = nft ]; then
    xenstore-write /local/domain/$A1ID/e2e-flow 1
    sport=""
    if wait_console a1 "^GUEST FLOW a1 OPEN " 60; then
        fl=$(tr -d '\r' </var/log/xen/console/guest-a1.log | sed -n 's/^GUEST FLOW a1 OPEN \([^ ]*\).*/\1/p' | head -1)
        sport=${fl##*:}
    fi
    sleep 3
    snap 7
    ct7=$(flow_ct 7 "${sport:-none}"); up7=$(uprule "-s $A1/32 -p tcp -m tcp --dport $FPORT")
    if [ -z "$sport" ]; then
        check netvm-flow-offloaded FAIL "a1 opened no flow: $(tr -d '\r' </var/log/xen/console/guest-a1.log | grep 'GUEST FLOW' | tr '\n' ' ')"
    elif echo "$ct7" | grep -q '\[OFFLOAD\]'; then
        check netvm-flow-offloaded PASS "a1 $fl -> $UP:$FPORT: $ct7"
    else
        check netvm-flow-offloaded FAIL "conntrack of a1's flow $fl: '${ct7:-none}'; all: $(section 7 conntrack | tr '\n' ';' | head -c 800)"
    fi
    xenstore-write /local/domain/$A1ID/e2e-forge 1
    wait_console a1 "^GUEST FORGED a1 " 60
    fg=$(tr -d '\r' </var/log/xen/console/guest-a1.log | sed -n 's/^GUEST FORGED a1 //p' | head -1)
    snap 8
    ct8=$(flow_ct 8 "${sport:-none}"); up8=$(uprule "-s $A1/32 -p tcp -m tcp --dport $FPORT")
    forged=$(uprule "-s $FORGEDF/32")
    sunk=$(grep -c "from $FORGEDF:" /tmp/upflow.log)
    if [ -n "$fg" ] && [ "${forged:-x}" = 0 ] && [ "$sunk" = 0 ] && echo "$ct8" | grep -q '\[OFFLOAD\]'; then
        check netvm-flow-forged-dropped PASS "a1 sent from $FORGEDF ($fg) while its flow stayed offloaded: upstream saw 0 packets from $FORGEDF, the sink nothing"
    else
        check netvm-flow-forged-dropped FAIL "a1: '${fg:-no answer}'; upstream saw '$forged' packets from $FORGEDF, sink lines $sunk; flow now: '${ct8:-none}'"
    fi
    f7=$(fwd_count 7); f8=$(fwd_count 8)
    if [ -n "$f7" ] && [ -n "$f8" ] && [ -n "$up7" ] && [ -n "$up8" ] && [ $((up8 - up7)) -ge 10 ] \
            && [ $((f8 - f7)) -lt $(((up8 - up7) / 4)) ]; then
        check netvm-flow-bypasses-forward PASS "upstream got $((up8 - up7)) packets of the flow between two snapshots, the netvm's forward hook (accel chain counter) saw $((f8 - f7))"
    else
        check netvm-flow-bypasses-forward FAIL "flow packets upstream '$up7' -> '$up8', forward hook '$f7' -> '$f8'"
    fi
    tr -d '\r' </var/log/xen/console/guest-a1.log | grep "^GUEST FLOW a1 CLOSED" | sed 's/^/E2E NOTE /'
fi

# ------------------------------------------------------- xl destroy offline in the netvm
timeout 120 xl destroy a1 >/tmp/xl-destroy-a1.log 2>&1 || check a1-destroy FAIL "$(tr '\n' ' ' </tmp/xl-destroy-a1.log)"
i=0
while xenstore-ls /local/domain/$NID/backend/vif/$A1ID >/dev/null 2>&1 && [ $i -lt 60 ]; do sleep 0.5; i=$((i+1)); done
sleep 2
snap 4
state_part 4 | grep -q "vif$A1ID\.0" && check netvm-clean-after-destroy FAIL "$(state_part 4 | grep "vif$A1ID\.0" | tr '\n' ';')" \
    || check netvm-clean-after-destroy PASS "no route, neighbour, link, record or rule of vif$A1ID.0 in the netvm"
section 4 routes | grep -q "^$A1 " && check netvm-no-route-after-destroy FAIL "$(section 4 routes | grep "^$A1 ")" \
    || check netvm-no-route-after-destroy PASS "no route to $A1 left"
# a1's flow was offloaded when it died: its vif is out of the flowtable
# (a2's still in), and conntrack holds nothing of its address
if [ "$NFW" = nft ]; then
    left=$(section 4 conntrack | grep -E "(src|dst)=$A1( |\$)")
    closed=$(tr -d '\r' </var/log/xen/console/guest-a1.log | grep "^GUEST FLOW a1 CLOSED")
    if ! has_dev 4 vif$A1ID.0 && has_dev 4 vif$A2ID.0 && [ -z "$left" ] && [ -z "$closed" ] \
            && echo "$ct8" | grep -q '\[OFFLOAD\]'; then
        check netvm-flowtable-after-destroy PASS "flow offloaded until xl destroy; now devices {$(flow_devices 4)}, no conntrack entry of $A1 ($(section 4 conntrack | grep -c '^[a-z]') entries left)"
    else
        check netvm-flowtable-after-destroy FAIL "devices {$(flow_devices 4)}; conntrack of $A1: $(echo "$left" | tr '\n' ';'); ${closed:-flow alive before destroy: '${ct8:-none}'}"
    fi
fi
# ------------------------------------------------------- the other backend
# The netvm moves to the other backend the way the README says (no vif
# left: xl devd restarted with the new setting, DNAT moved, nft's tables
# dropped when leaving nft), then one more AppVM a3 goes through hotplug,
# its guard, upstream, DNS, a forged source and destroy with it.
timeout 120 xl destroy a2 >/tmp/xl-destroy-a2.log 2>&1 || check a2-destroy FAIL "$(tr '\n' ' ' </tmp/xl-destroy-a2.log)"
i=0
while xenstore-ls /local/domain/$NID/backend/vif/$A2ID >/dev/null 2>&1 && [ $i -lt 60 ]; do sleep 0.5; i=$((i+1)); done
xenstore-write /local/domain/$NID/e2e-req "switch-$OFW-1"
wait_console netvm "^NETVM SWITCHED switch-$OFW-1 " 60
sw=$(tr -d '\r' <$NLOG | sed -n "s/^NETVM SWITCHED switch-$OFW-1 //p" | head -1)
case "$sw" in
    PASS*) check netvm-$OFW-switch PASS "${sw#PASS }" ;;
    *) check netvm-$OFW-switch FAIL "${sw:-no answer from the netvm}" ;;
esac
# a3's vif line names only its address: the netvm and our script come from
# xl.conf, set by qvm-set-default-netvm (Debian's own xl.conf, edited)
if $SETNET netvm >/tmp/setnet.out 2>&1 && [ "$($SETNET --show)" = "$(printf 'vif.default.backend=netvm\nvif.default.script=vif-route-qubes')" ] \
        && $SETNET netvm | grep -q already; then
    check set-default-netvm PASS "$(tr '\n' ' ' </tmp/setnet.out); $(grep -c . /tmp/xl.conf.before) lines before, $(diff /tmp/xl.conf.before /etc/xen/xl.conf | grep -c '^[<>]') changed: $(diff /tmp/xl.conf.before /etc/xen/xl.conf | grep '^[<>]' | tr '\n' ' ')"
else
    check set-default-netvm FAIL "$(tr '\n' ' ' </tmp/setnet.out); $($SETNET --show 2>&1 | tr '\n' ' ')"
fi
appvm_cfg a3 $A3 "e2e_dns=resolv e2e_forged=$FORGED3" "ip=$A3"
if timeout 200 xl create -p /tmp/a3.cfg >/tmp/xl-a3.log 2>&1 && $KEYS guest a3 >/tmp/keys-a3.log 2>&1 \
        && xl unpause a3; then
    check netvm-$OFW-a3-create PASS "at +$(elapsed)s, domid $(xl domid a3)"
else
    check netvm-$OFW-a3-create FAIL "$(tail -c 600 /tmp/xl-a3.log /tmp/keys-a3.log | tr '\n' ' ')"
fi
A3ID=$(xl domid a3 2>/dev/null)
if [ -n "$A3ID" ] && wait_connected $A3ID; then
    check netvm-$OFW-a3-hotplug-in-netvm PASS "hotplug-status=connected at +$(elapsed)s"
else
    check netvm-$OFW-a3-hotplug-in-netvm FAIL "hotplug-status='$(xenstore-read /local/domain/$NID/backend/vif/$A3ID/0/hotplug-status 2>&1)' error='$(xenstore-read /local/domain/$NID/backend/vif/$A3ID/0/hotplug-error 2>&1)'"
fi
snap 5
d=$(snap_guard 5 $OFW vif$A3ID.0 $A3) && check netvm-$OFW-a3-guard PASS "$d" || check netvm-$OFW-a3-guard FAIL "$d"
sc=$(xenstore-read /local/domain/$NID/backend/vif/$A3ID/0/script 2>&1)
[ "$sc" = /etc/xen/scripts/vif-route-qubes ] && ! grep -q "vif$A3ID\.0" /var/log/xen/xen-hotplug.log 2>/dev/null \
    && check default-netvm-a3-served-by-netvm PASS "vif line 'ip=$A3' only: backend netvm (domid $NID), script $sc, none run in dom0" \
    || check default-netvm-a3-served-by-netvm FAIL "script '$sc'; dom0 log: $(grep "vif$A3ID\.0" /var/log/xen/xen-hotplug.log 2>&1 | tail -2 | tr '\n' ' ')"
if wait_console a3 "^GUEST DONE" 240; then note "a3 finished its checks at +$(elapsed)s"
else check netvm-$OFW-a3-finished FAIL "no GUEST DONE: $(tail -c 1200 /var/log/xen/console/guest-a3.log 2>&1 | tr '\n' ' ')"; fi
tr -d '\r' </var/log/xen/console/guest-a3.log 2>/dev/null |
    sed -n 's/^GUEST CHECK \([^ ]*\) \(PASS\|FAIL\) \?\(.*\)$/\1 \2 \3/p' |
    while read -r n s d; do echo "E2E CHECK netvm-$OFW-appvm-$n $s $d"; done
tr -d '\r' </var/log/xen/console/guest-a3.log 2>/dev/null | grep -q "^GUEST CHECK .* FAIL" && FAILED=1
tr -d '\r' </var/log/xen/console/guest-a3.log 2>/dev/null | grep -q "^GUEST CHECK" || FAILED=1
grep -q "query from $A3 " /tmp/updns.log \
    && check netvm-$OFW-dns-upstream PASS "$(grep -c "query from $A3 " /tmp/updns.log) queries from $A3 reached the resolver at $UP" \
    || check netvm-$OFW-dns-upstream FAIL "resolver log: $(tr '\n' ' ' </tmp/updns.log)"
forged=$(upcnt $FORGED3); genuine=$(upcnt $A3)
[ "${forged:-x}" = 0 ] && [ "${genuine:-0}" -gt 0 ] \
    && check netvm-$OFW-forged-dropped-in-netvm PASS "upstream saw 0 packets from $FORGED3, $genuine from $A3" \
    || check netvm-$OFW-forged-dropped-in-netvm FAIL "upstream saw '$forged' from $FORGED3, '$genuine' from $A3"
timeout 120 xl destroy a3 >/tmp/xl-destroy-a3.log 2>&1 || check a3-destroy FAIL "$(tr '\n' ' ' </tmp/xl-destroy-a3.log)"
i=0
while xenstore-ls /local/domain/$NID/backend/vif/$A3ID >/dev/null 2>&1 && [ $i -lt 60 ]; do sleep 0.5; i=$((i+1)); done
sleep 2
snap 6
state_part 6 | grep -qE "vif$A3ID\.0|$A3\b" && check netvm-$OFW-clean-after-destroy FAIL "$(state_part 6 | grep -E "vif$A3ID\.0|$A3\b" | tr '\n' ';')" \
    || check netvm-$OFW-clean-after-destroy PASS "no route, neighbour, link, record or $OFW rule of vif$A3ID.0 or $A3 in the netvm"

# ------------------------------------------------------- back to dom0
# qvm-set-default-netvm dom0: the next guest whose vif line names only its
# address is served by dom0 with our script (dom0's qubes_netvm_gateway is
# still set from the first part; its firewall: the default, nft)
D1=10.137.0.30 FORGEDD=10.137.0.96
if $SETNET dom0 >/tmp/setnet0.out 2>&1 && [ "$($SETNET --show)" = "$(printf 'vif.default.backend=0\nvif.default.script=vif-route-qubes')" ]; then
    check set-default-netvm-dom0 PASS "$(tr '\n' ' ' </tmp/setnet0.out)"
else
    check set-default-netvm-dom0 FAIL "$(tr '\n' ' ' </tmp/setnet0.out); $($SETNET --show 2>&1 | tr '\n' ' ')"
fi
cat >/tmp/d1.cfg <<CFG
name = "d1"
type = "pv"
kernel = "/e2e/vmlinux"
ramdisk = "/e2e/guest.cpio.zst"
extra = "console=hvc0 quiet e2e_name=d1 e2e_ip=$D1 e2e_gw=$GW e2e_forged=$FORGEDD"
memory = 128
vcpus = 1
on_crash = "destroy"
vif = [ 'ip=$D1' ]
CFG
if timeout 150 xl create /tmp/d1.cfg >/tmp/xl-d1.log 2>&1; then
    D1ID=$(xl domid d1)
    XP=/local/domain/0/backend/vif/$D1ID/0
    st=$(xenstore-read $XP/hotplug-status 2>&1); sc=$(xenstore-read $XP/script 2>&1)
    [ "$st" = connected ] && [ "$sc" = /etc/xen/scripts/vif-route-qubes ] \
        && ! xenstore-ls /local/domain/$NID/backend/vif/$D1ID >/dev/null 2>&1 \
        && check default-dom0-d1-served-by-dom0 PASS "vif line 'ip=$D1' only: $XP hotplug-status=connected, script $sc" \
        || check default-dom0-d1-served-by-dom0 FAIL "hotplug-status='$st' script='$sc' error='$(xenstore-read $XP/hotplug-error 2>&1)'"
    r=$(ip -4 route show $D1/32 2>&1)
    echo "$r" | grep -q "dev vif$D1ID.0" && grep -q "online vif$D1ID.0" /var/log/xen/xen-hotplug.log \
        && check default-dom0-d1-hotplug-in-dom0 PASS "$r; dom0's hotplug log: online vif$D1ID.0" \
        || check default-dom0-d1-hotplug-in-dom0 FAIL "route: $r; log: $(tail -3 /var/log/xen/xen-hotplug.log 2>&1 | tr '\n' ' ')"
    log=/var/log/xen/console/guest-d1.log
    i=0
    while ! grep -q "GUEST DONE" $log 2>/dev/null && [ $i -lt 180 ]; do sleep 1; i=$((i+1)); done
    grep -q "GUEST DONE" $log 2>/dev/null || check default-dom0-d1-finished FAIL "no GUEST DONE: $(tail -c 1200 $log 2>&1 | tr '\n' ' ')"
    tr -d '\r' <$log 2>/dev/null | sed -n 's/^GUEST CHECK \([^ ]*\) \(PASS\|FAIL\) \?\(.*\)$/\1 \2 \3/p' |
        while read -r n s d; do echo "E2E CHECK default-dom0-guest-$n $s $d"; done
    tr -d '\r' <$log 2>/dev/null | grep -q "^GUEST CHECK d1-ping-gateway PASS" || FAILED=1
    tr -d '\r' <$log 2>/dev/null | grep -q "^GUEST CHECK d1-forged-source PASS" || FAILED=1
    timeout 120 xl destroy d1 >/tmp/xl-destroy-d1.log 2>&1 || check d1-destroy FAIL "$(tr '\n' ' ' </tmp/xl-destroy-d1.log)"
else
    check default-dom0-d1-create FAIL "$(tail -c 800 /tmp/xl-d1.log | tr '\n' ' ')"
fi

if [ $FAILED != 0 ]; then
    tail -n 30 $NLOG | sed 's/^/E2E CONSOLE-netvm /'
    for g in a1 a2 a3 d1; do tail -n 15 /var/log/xen/console/guest-$g.log 2>/dev/null | sed "s/^/E2E CONSOLE-$g /"; done
    tail -n 20 /tmp/up.err /tmp/down.err 2>/dev/null | sed 's/^/E2E DOM0-NET /'
fi
