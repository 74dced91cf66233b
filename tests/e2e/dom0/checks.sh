#!/bin/sh
# The e2e checks, run by /init inside the real dom0. Every check prints
#   E2E CHECK <name> PASS|FAIL <detail>
# and the script ends with "E2E RESULT PASS|FAIL" (exit 0 / 1).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# the hotplug script inherits xl's environment: ask it to log argv + env
export VIF_ROUTE_QUBES_DEBUG=1
# the dom0-backend checks run once per firewall backend (dom0_round below
# sets VIF_ROUTE_QUBES_FIREWALL); netvm.sh runs the netvm layout with the
# product's default, then one more AppVM with the other backend
# the commands of the Debian packages (apt-get install ./*.deb in the image)
BIN=/usr/bin
DNAT_TOOL=$BIN/qubes-setup-dnat-to-ns
[ -f /e2e/env ] && . /e2e/env
GW=10.137.0.1 DNS1=10.139.1.1 DNS2=10.139.1.2
UPSTREAM=192.0.2.53 FORGED=10.137.0.99
FAILED=0
T0=$(cut -d' ' -f1 /proc/uptime)

check() {  # name PASS|FAIL detail...
    n=$1 s=$2; shift 2
    echo "E2E CHECK $n $s $*"
    [ "$s" = PASS ] || FAILED=1
}
expect() {  # name detail -- command...: PASS if the command succeeds
    n=$1 d=$2; shift 3
    if "$@" >/tmp/expect.out 2>&1; then check "$n" PASS "$d"
    else check "$n" FAIL "$d: $(tail -c 600 /tmp/expect.out | tr '\n' ' ')"; fi
}
note() { echo "E2E NOTE $*"; }
elapsed() { awk -v t0="$T0" '{printf "%.1f", $1 - t0}' /proc/uptime; }

# ---------------------------------------------------------------- Xen up
for m in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-netback dummy; do
    modprobe $m || note "modprobe $m failed"
done
mountpoint -q /proc/xen || mount -t xenfs xenfs /proc/xen
/etc/init.d/xen start
sysctl -qw net.ipv4.ip_forward=1
# no reverse-path filter: only our rules may stop a forged source
for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 >"$f"; done
if xl info >/tmp/xlinfo 2>&1; then
    check xen-up PASS "$(grep -E '^xen_version' /tmp/xlinfo | tr -s ' ')"
else
    check xen-up FAIL "$(tr '\n' ' ' </tmp/xlinfo)"
    echo "E2E RESULT FAIL"; exit 1
fi

# ---------------------------------------------------------------- install
drop=/etc/xen/scripts/vif-route-qubes
expect drop-in-installed "$drop, $BIN/vif-route-qubes, $DNAT_TOOL" -- \
    sh -c "test -x $drop && test -x $BIN/vif-route-qubes && test -x $DNAT_TOOL"
pk=$(dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\n' python3-vif-route-qubes \
    vif-route-qubes-netvm vif-route-qubes-dom0 2>&1)
[ "$(echo "$pk" | grep -c ' ii *$')" = 3 ] && check packages-installed PASS "$(echo "$pk" | tr '\n' ';')" \
    || check packages-installed FAIL "$(echo "$pk" | tr '\n' ';')"

# ---------------------------------------------------------------- 1. netvm keys
xenstore-write /local/domain/0/qubes_netvm_gateway $GW \
    /local/domain/0/qubes_netvm_primary_dns $DNS1 \
    /local/domain/0/qubes_netvm_secondary_dns $DNS2
got="$(xenstore-read /local/domain/0/qubes_netvm_gateway /local/domain/0/qubes_netvm_primary_dns \
    /local/domain/0/qubes_netvm_secondary_dns | tr '\n' ' ')"
[ "$got" = "$GW $DNS1 $DNS2 " ] && check netvm-keys PASS "$got" || check netvm-keys FAIL "read back: $got"

# ---------------------------------------------------------------- DNS upstream, counters
ip link add dns0 type dummy && ip addr add $UPSTREAM/32 dev dns0 && ip link set dns0 up
python3 /e2e/dns_responder.py $UPSTREAM >/tmp/dns.log 2>&1 &
echo "nameserver $UPSTREAM" >/tmp/resolv.conf
# counters seen by dom0's INPUT for the forged source and for a genuine one
# (filter-table rules: they count what got past either backend's raw guard)
iptables -w -A INPUT -s $FORGED -p icmp -j ACCEPT
iptables -w -A INPUT -s 10.137.0.10 -p icmp -j ACCEPT
# IPv6 from a vif without an IPv6 address must not get in either
ip6tables -w -A INPUT -i vif+ -p ipv6-icmp --icmpv6-type echo-request -j ACCEPT
cnt() { iptables-save -c -t filter | grep -- "-A INPUT -s $1/32 -p icmp" | sed -n 's/^\[\([0-9]*\):.*/\1/p' | head -1; }

guest_cfg() {  # name ip [extra]: domain FW-name, console guest-FW-name.log
    cat >/tmp/$FW-$1.cfg <<EOF
name = "$FW-$1"
type = "pv"
kernel = "/e2e/vmlinux"
ramdisk = "/e2e/guest.cpio.zst"
extra = "console=hvc0 quiet e2e_name=$1 e2e_ip=$2 e2e_gw=$GW $3"
memory = 128
vcpus = 1
on_crash = "destroy"
vif = [ 'script=vif-route-qubes,ip=$2' ]
EOF
}
raw_chains() { { iptables -w -t raw -S; ip6tables -w -t raw -S; } 2>/dev/null | grep -- 'vrq-' ; }
# the guard (default deny) as it stays once no vif is left: one per family
GUARD_JUMP='-A PREROUTING -m devgroup --src-group 0x2 -m comment --comment vrq-guard -j vrq-guard'
idle_guard() { grep -v -x -e '-N vrq-guard' -e '-A vrq-guard -j DROP' -e "$GUARD_JUMP" ; }
# what the backend holds for guests: iptables raw rules naming a vif (not a
# shared dispatch chain, whose layout may change), nft set elements
fw_state() {
    if [ "$FW" = nft ]; then
        { nft list table ip qubes; nft list table ip6 qubes; } 2>/dev/null | grep -E '"vif[0-9]|10\.137\.0\.[0-9]{2,3}\b'
    else
        { iptables -w -t raw -S; ip6tables -w -t raw -S; } 2>/dev/null | grep -E 'vrq-.*vif[0-9]'
    fi
}
# the DNAT rules of the backend to UPSTREAM, one per line
dnat_rules() {
    if [ "$FW" = nft ]; then nft list chain ip qubes dnat-dns 2>/dev/null | grep "dnat to $UPSTREAM"
    else iptables -w -t nat -S 2>/dev/null | grep -- "--to-destination $UPSTREAM"; fi
}
# the guard of one vif (vif ip): PASS detail on stdout, exit 1 with what is missing
fw_guard() {
    miss=""
    if [ "$FW" = nft ]; then
        a4=$(nft list set ip qubes allowed 2>&1); d4=$(nft list set ip qubes downstream 2>&1)
        a6=$(nft list set ip6 qubes allowed 2>&1); pr=$(nft list chain ip qubes prerouting 2>&1)
        echo "$a4" | grep -qF "\"$1\" . $2" || miss="$miss ip-qubes-allowed:\"$1\".$2"
        echo "$d4" | grep -qE "(^|[^0-9.])$2([^0-9]|\$)" || miss="$miss ip-qubes-downstream:$2"
        echo "$a6" | grep -qF "\"$1\"" && miss="$miss ip6-qubes-allowed-has-$1(no-IPv6-address)"
        echo "$pr" | grep -q "iifgroup.*antispoof" || miss="$miss prerouting->antispoof"
        [ -z "$miss" ] && echo "\"$1\" . $2 in ip qubes allowed, $2 in downstream, nothing in ip6 qubes allowed" && return 0
    else
        c4=$(iptables -w -t raw -S 2>&1); c6=$(ip6tables -w -t raw -S 2>&1)
        for c in vrq-in-$1 vrq-src-$1; do
            # the chain exists and raw jumps or goes to it (however the jumps are laid out)
            echo "$c4" | grep -q -- "-N $c\$" || miss="$miss iptables:-N $c"
            echo "$c6" | grep -q -- "-N $c\$" || miss="$miss ip6tables:-N $c"
            echo "$c4" | grep -qE -- "-[jg] $c\$" || miss="$miss iptables:->$c"
            echo "$c6" | grep -qE -- "-[jg] $c\$" || miss="$miss ip6tables:->$c"
        done
        echo "$c4" | grep -q -- "-A vrq-in-$1 .*-s $2/32" || miss="$miss iptables:vrq-in-$1-s-$2"
        # the default deny: everything from group 2 enters the guard, whose DROP is last
        for t in c4 c6; do
            eval "rules=\$$t"
            echo "$rules" | grep -q -x -- "$GUARD_JUMP" || miss="$miss $t:PREROUTING->vrq-guard"
            [ "$(echo "$rules" | grep -- '^-A vrq-guard ' | tail -n 1)" = "-A vrq-guard -j DROP" ] \
                || miss="$miss $t:vrq-guard-DROP-last"
        done
        [ -z "$miss" ] && echo "vrq-in-$1, vrq-src-$1 reached from raw (v4+v6), $2 allowed" && return 0
    fi
    echo "missing:$miss"; return 1
}
# packets the backend's raw guard dropped for a vif (detail only)
drops() {  # vif family(4|6)
    [ "$FW" = nft ] && { echo "nft antispoof"; return; }
    if [ $2 = 4 ]; then save=iptables-save; else save=ip6tables-save; fi
    echo "vrq-in-$1 DROP counted $($save -c -t raw | grep -- "-A vrq-in-$1 .*-j DROP" | sed -n 's/^\[\([0-9]*\):.*/\1/p' | awk '{s += $1} END {print s + 0}')"
}

# ---------------------------------------------------------------- one round per backend
dom0_round() {  # iptables|nft: every check of the round is named "$FW-..."
FW=$1
export VIF_ROUTE_QUBES_FIREWALL=$FW
note "dom0 round with the $FW backend at +$(elapsed)s"
iptables -w -Z INPUT; ip6tables -w -Z INPUT
dnsq0=$(wc -l </tmp/dns.log)

# ------------------------------------------------ 4a. DNAT
$DNAT_TOOL --resolv-conf /tmp/resolv.conf >/tmp/dnat.out 2>&1; rc=$?
nat="$(dnat_rules | tr '\n' ';')"
if [ $rc = 0 ] && echo "$nat" | grep -qE -- "(-d $DNS1/32|daddr $DNS1 )" && echo "$nat" | grep -qE -- "(-d $DNS2/32|daddr $DNS2 )"; then
    check $FW-dnat-setup PASS "exit 0, $(echo "$nat" | tr ';' '\n' | grep -c .) $FW DNAT rules to $UPSTREAM"
else
    check $FW-dnat-setup FAIL "exit $rc: $(tr '\n' ' ' </tmp/dnat.out) rules: $nat"
fi
$DNAT_TOOL --resolv-conf /tmp/resolv.conf >/tmp/dnat.out 2>&1; rc=$?
[ $rc = 100 ] && check $FW-dnat-unchanged PASS "second run exit 100" \
    || check $FW-dnat-unchanged FAIL "second run exit $rc: $(tr '\n' ' ' </tmp/dnat.out)"
if [ -n "$2" ]; then  # the documented move: the new backend first, then the old one --remove
    FW=$2 old="$(dnat_rules)"; FW=$1
    if VIF_ROUTE_QUBES_FIREWALL=$2 $DNAT_TOOL --remove --resolv-conf /tmp/resolv.conf >/tmp/dnat.out 2>&1 \
            && [ -z "$(FW=$2; dnat_rules)" ] && [ -n "$(dnat_rules)" ]; then
        check $FW-dnat-moved-from-$2 PASS "$2's $(echo "$old" | grep -c .) DNAT rules removed with --remove, $FW's stay"
    else
        check $FW-dnat-moved-from-$2 FAIL "$(tr '\n' ' ' </tmp/dnat.out); $2 left: $(FW=$2; dnat_rules | tr '\n' ';')"
    fi
fi

# ------------------------------------------------ 1/2. guests
guest_cfg g1 10.137.0.10 "e2e_dns=$DNS1 e2e_forged=$FORGED e2e_ipv6=1"
guest_cfg g2 10.137.0.11 "e2e_dns=$DNS2"
for g in g1 g2; do
    if timeout 150 xl create /tmp/$FW-$g.cfg >/tmp/xl-$FW-$g.log 2>&1; then
        check $FW-$g-create PASS "xl create ok at +$(elapsed)s, domid $(xl domid $FW-$g)"
    else
        check $FW-$g-create FAIL "$(tail -c 800 /tmp/xl-$FW-$g.log | tr '\n' ' ')"
    fi
done

for g in g1 g2; do
    case $g in g1) ip=10.137.0.10 ;; g2) ip=10.137.0.11 ;; esac
    eval "${g}_vif= ${g}_ip=$ip"
    domid=$(xl domid $FW-$g 2>/dev/null) || { check $FW-$g-online FAIL "no domain"; continue; }
    vif=vif$domid.0
    XP=/local/domain/0/backend/vif/$domid/0
    eval "${g}_vif=$vif"
    st=$(xenstore-read $XP/hotplug-status 2>&1)
    [ "$st" = connected ] && check $FW-$g-hotplug-status PASS "$XP/hotplug-status=connected" \
        || check $FW-$g-hotplug-status FAIL "hotplug-status='$st' error='$(xenstore-read $XP/hotplug-error 2>&1)'"
    r=$(ip -4 route show $ip/32 2>&1)
    echo "$r" | grep -q "dev $vif .*metric $((32752 - domid))" \
        && check $FW-$g-route PASS "$ip/32 dev $vif metric $((32752 - domid))" \
        || check $FW-$g-route FAIL "got: $r"
    a=$(ip -4 -o addr show dev $vif 2>&1)
    echo "$a" | grep -q "inet $GW/32" && check $FW-$g-gateway-addr PASS "$GW/32 on $vif" \
        || check $FW-$g-gateway-addr FAIL "got: $a"
    mac=$(xenstore-read $XP/mac)
    n=$(ip neigh show $ip dev $vif 2>&1)
    echo "$n" | grep -qi "lladdr $mac PERMANENT" && check $FW-$g-neighbour PASS "$ip lladdr $mac PERMANENT" \
        || check $FW-$g-neighbour FAIL "want $mac PERMANENT, got: $n"
    pa=$(cat /proc/sys/net/ipv4/conf/$vif/proxy_arp 2>&1)
    [ "$pa" = 1 ] && check $FW-$g-proxy-arp PASS "proxy_arp=1" || check $FW-$g-proxy-arp FAIL "proxy_arp=$pa"
    if d=$(fw_guard $vif $ip); then check $FW-$g-guard PASS "$d"; else check $FW-$g-guard FAIL "$d"; fi
    rec=$(cat /run/vif-route-qubes/$vif.json 2>/dev/null)
    [ -n "$rec" ] && check $FW-$g-state-record PASS "/run/vif-route-qubes/$vif.json" \
        || check $FW-$g-state-record FAIL "no /run/vif-route-qubes/$vif.json ($(ls /run/vif-route-qubes 2>&1))"
done

# ------------------------------------------------ 3/4. guest side
for g in g1 g2; do
    log=/var/log/xen/console/guest-$FW-$g.log
    i=0
    while ! grep -q "GUEST DONE" $log 2>/dev/null && [ $i -lt 180 ]; do sleep 1; i=$((i+1)); done
    if grep -q "GUEST DONE" $log 2>/dev/null; then
        note "$FW-$g console finished at +$(elapsed)s"
    else
        check $FW-$g-guest-finished FAIL "no GUEST DONE after ${i}s; console: $(tail -c 1500 $log 2>&1 | tr '\n' ' ')"
    fi
    tr -d '\r' <$log 2>/dev/null | sed -n 's/^GUEST CHECK \([^ ]*\) \(PASS\|FAIL\) \?\(.*\)$/\1 \2 \3/p' |
        while read -r n s d; do echo "E2E CHECK $FW-guest-$n $s $d"; done
    tr -d '\r' <$log 2>/dev/null | grep -q "^GUEST CHECK .* FAIL" && FAILED=1
    tr -d '\r' <$log 2>/dev/null | grep -q "^GUEST CHECK" || FAILED=1
done
tail -n +$((dnsq0 + 1)) /tmp/dns.log >/tmp/dns-$FW.log
grep -q "query from 10.137.0.10" /tmp/dns-$FW.log && check $FW-dns-reached-upstream PASS \
    "$(grep -c 'query from' /tmp/dns-$FW.log) queries from guests reached $UPSTREAM" \
    || check $FW-dns-reached-upstream FAIL "responder log: $(tr '\n' ' ' </tmp/dns-$FW.log)"

# ------------------------------------------------ 3. forged source, counted in dom0
forged=$(cnt $FORGED); genuine=$(cnt 10.137.0.10)
if [ "${forged:-x}" = 0 ] && [ "${genuine:-0}" -gt 0 ]; then
    check $FW-forged-source-dropped PASS "dom0 INPUT saw 0 packets from $FORGED, $genuine from 10.137.0.10; $(drops $g1_vif 4)"
else
    check $FW-forged-source-dropped FAIL "dom0 INPUT saw '$forged' packets from $FORGED, '$genuine' from 10.137.0.10; $(drops $g1_vif 4)"
fi

v6in=$(ip6tables-save -c -t filter | grep -- "-A INPUT -i vif+ -p ipv6-icmp" | sed -n 's/^\[\([0-9]*\):.*/\1/p' | head -1)
glog=/var/log/xen/console/guest-$FW-g1.log
if grep -q "GUEST CHECK g1-ipv6-sent" $glog && [ "${v6in:-x}" = 0 ]; then
    check $FW-ipv6-dropped PASS "dom0 INPUT saw 0 IPv6 echo requests from the vifs; $(drops $g1_vif 6)"
else
    check $FW-ipv6-dropped FAIL "dom0 INPUT saw '$v6in' IPv6 echo requests from the vifs (guest sent: $(grep -c 'g1-ipv6-sent' $glog)); $(drops $g1_vif 6)"
fi

# ------------------------------------------------ 5. malformed ip
before_fw=$(fw_state | sort); before_rec=$(ls /run/vif-route-qubes 2>/dev/null | grep -vx -e lock -e flowtable-unsupported | sort)
guest_cfg g3 10.137.0.300
if timeout 150 xl create /tmp/$FW-g3.cfg >/tmp/xl-$FW-g3.log 2>&1; then
    check $FW-bad-ip-create-fails FAIL "xl create of ip=10.137.0.300 succeeded"
    xl destroy $FW-g3 >/dev/null 2>&1
else
    check $FW-bad-ip-create-fails PASS "xl create exit non-zero"
fi
herr=$(sed -n 's/.*script: \(.\+\)$/\1/p' /tmp/xl-$FW-g3.log | head -1)
echo "$herr" | grep -q '10\.137\.0\.300' && check $FW-bad-ip-hotplug-error PASS "xl reported: $herr" \
    || check $FW-bad-ip-hotplug-error FAIL "no 'script: <hotplug-error naming 10.137.0.300>' in xl output: $(tail -c 1200 /tmp/xl-$FW-g3.log | tr '\n' ' ')"
sleep 1
after_fw=$(fw_state | sort); after_rec=$(ls /run/vif-route-qubes 2>/dev/null | grep -vx -e lock -e flowtable-unsupported | sort)
left=""
xl domid $FW-g3 >/dev/null 2>&1 && left="$left domain $FW-g3 still exists;"
[ "$before_fw" = "$after_fw" ] || left="$left $FW guard changed: $(echo "$after_fw" | tr '\n' ';');"
[ "$before_rec" = "$after_rec" ] || left="$left records: $after_rec;"
ip route show | grep -q '10\.137\.0\.30' && left="$left route: $(ip route show | grep '10\.137\.0\.30');"
[ -z "$left" ] && check $FW-bad-ip-nothing-left PASS "no new $FW guard, record or route" \
    || check $FW-bad-ip-nothing-left FAIL "$left"

# ------------------------------------------------ 6. destroy
for g in g1 g2; do
    eval "vif=\$${g}_vif ip=\$${g}_ip"
    [ -n "$vif" ] || continue
    if timeout 120 xl destroy $FW-$g >/tmp/xl-destroy-$FW-$g.log 2>&1; then :; else
        check $FW-$g-destroy FAIL "$(tr '\n' ' ' </tmp/xl-destroy-$FW-$g.log)"
    fi
    i=0  # offline runs as the backend goes away; give it a moment
    while [ -e /run/vif-route-qubes/$vif.json ] && [ $i -lt 20 ]; do sleep 0.5; i=$((i+1)); done
    left=""
    ip route show | grep -q "^$ip " && left="$left route: $(ip route show | grep "^$ip ");"
    ip neigh show | grep -q "^$ip " && left="$left neighbour: $(ip neigh show | grep "^$ip ");"
    fw_state | grep -qF -- "$vif" && left="$left $FW: $(fw_state | grep -F -- "$vif" | tr '\n' ';');"
    fw_state | grep -qE -- "$ip\b" && left="$left $FW: $(fw_state | grep -E -- "$ip\b" | tr '\n' ';');"
    [ -e /run/vif-route-qubes/$vif.json ] && left="$left record /run/vif-route-qubes/$vif.json;"
    [ -z "$left" ] && check $FW-$g-offline-clean PASS "no route, neighbour, $FW guard or record for $vif" \
        || check $FW-$g-offline-clean FAIL "$left"
done
left=$(fw_state | tr '\n' ';')
[ -z "$left" ] && check $FW-no-guard-left PASS "$FW holds nothing for any vif or guest address" \
    || check $FW-no-guard-left FAIL "$left"
if [ "$FW" = iptables ]; then
    # the default deny outlives the last vif (offline never removes the guard)
    n=$(raw_chains | grep -c -x -e '-A vrq-guard -j DROP' -e "$GUARD_JUMP")
    [ "$n" = 4 ] && check $FW-guard-stays PASS "vrq-guard and its jump stay in both families" \
        || check $FW-guard-stays FAIL "$(raw_chains | grep -- vrq-guard | tr '\n' ';')"
fi
}

# iptables first, then nft with the DNAT moved over as the README says
# (whose default deny then stays in dom0: nft's tables outlive their vifs)
dom0_round iptables
# leaving iptables, its guard goes by hand as the README says: its default
# deny would drop every guest of the nft backend
for t in iptables ip6tables; do
    $t -w -t raw -D PREROUTING -m devgroup --src-group 2 -m comment --comment vrq-guard -j vrq-guard
    $t -w -t raw -F vrq-guard; $t -w -t raw -X vrq-guard
done
dom0_round nft iptables
unset VIF_ROUTE_QUBES_FIREWALL

# ---------------------------------------------------------------- 7. argv + env, for the record
grep -h -i -E "argv|environ|XENBUS_PATH" /var/log/xen/xen-hotplug.log /tmp/xl-*.log 2>/dev/null \
    | head -40 | sed 's/^/E2E HOTPLUG-LOG /' >/tmp/hlog
cat /tmp/hlog
if grep -q XENBUS_PATH /tmp/hlog && grep -q online /tmp/hlog && grep -q offline /tmp/hlog; then
    check debug-log PASS "argv and environment of online and offline logged ($(wc -l </tmp/hlog) lines)"
else
    check debug-log FAIL "VIF_ROUTE_QUBES_DEBUG=1 output not found in xen-hotplug.log or xl output"
fi
note "xen-hotplug.log tail:"
tail -n 15 /var/log/xen/xen-hotplug.log 2>/dev/null | sed 's/^/E2E HOTPLUG-LOG-TAIL /'

note "dom0-backend checks done at +$(elapsed)s"

# ---------------------------------------------------------------- 8. the netvm layout
. /e2e/netvm.sh

note "checks done at +$(elapsed)s"
if [ $FAILED != 0 ]; then
    dmesg | tail -n 40 | sed 's/^/E2E DMESG /'
    for g in iptables-g1 iptables-g2 iptables-g3 nft-g1 nft-g2 nft-g3; do
        tail -n 20 /var/log/xen/console/guest-$g.log 2>/dev/null | sed "s/^/E2E CONSOLE-$g /"
    done
fi
if [ $FAILED = 0 ]; then echo "E2E RESULT PASS"; exit 0; fi
echo "E2E RESULT FAIL"; exit 1
