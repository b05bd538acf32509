# Shell helpers for the guest test scripts (/test/run.sh sources this file).
# run.sh runs under `sh -ex`; the helpers switch the trace off inside so that
# it shows the test's own commands.
set -o pipefail
# dd, mke2fs... as functions running the real programs, not busybox applets
. /lib/lbd/real-programs.sh

# result KEY VALUE...: a line the host parses (tests/kernel/conftest.py)
result() {
    { set +x; } 2>/dev/null
    echo "LBD-RESULT $*"
    set -x
}

_port_dev() {
    local i=0 p
    while [ $i -lt 100 ]; do
        for p in /sys/class/virtio-ports/*; do
            if [ -e "$p/name" ] && [ "$(cat "$p/name")" = "$1" ] && [ -c "/dev/${p##*/}" ]; then
                echo "/dev/${p##*/}"
                return 0
            fi
        done
        sleep 0.1
        i=$((i + 1))
    done
    echo "lbd-guest: no virtio-serial port named $1" >&2
    return 1
}

# port_dev NAME: the /dev node of the virtio-serial port QEMU named NAME
port_dev() {
    { set +x; } 2>/dev/null
    _port_dev "$@"
}

_nbd_attach() {
    local dev=$1 name=$2 ports=$3 n=0 p sock i
    shift 3
    for p in $ports; do
        _port_dev "$p" >/dev/null || return 1
        n=$((n + 1))
    done
    sock=/run/${dev##*/}.sock
    rm -f "$sock"
    if [ $n -eq 1 ]; then
        socat "UNIX-LISTEN:$sock" "GOPEN:$(_port_dev $ports)" &
    else
        # several connections to one socket: each accepted one is relayed to
        # the next unclaimed port
        socat "UNIX-LISTEN:$sock,fork" "EXEC:/lib/lbd/pick-port $ports" &
    fi
    i=0
    while [ ! -S "$sock" ]; do
        sleep 0.05
        i=$((i + 1))
        if [ $i -ge 200 ]; then
            echo "lbd-guest: socat did not listen on $sock" >&2
            return 1
        fi
    done
    if [ -n "$name" ]; then
        set -- -N "$name" "$@"
    fi
    echo "lbd-guest: nbd-client -unix $sock $dev -b 4096 -C $n $*"
    nbd-client -unix "$sock" "$dev" -b 4096 -C "$n" "$@"
}

# nbd_attach DEVICE EXPORT "PORT [PORT...]" [NBD-CLIENT-OPTIONS...]
# Connect DEVICE (/dev/nbdN) to the export ("": no -N, the default export)
# with one NBD connection per port
# (nbd-client -C N): a socat in the guest relays the Unix socket nbd-client
# connects to, to the port, which QEMU relays to LBD's socket on the host.
nbd_attach() {
    { set +x; } 2>/dev/null
    _nbd_attach "$@" || return 1
    set -x
}

# nbd_detach DEVICE: disconnect (NBD_CMD_DISC) and wait until the kernel let go
nbd_detach() {
    { set +x; } 2>/dev/null
    local i=0
    nbd-client -d "$1" || return 1
    while [ -e "/sys/block/${1##*/}/pid" ]; do
        sleep 0.05
        i=$((i + 1))
        if [ $i -ge 200 ]; then
            echo "lbd-guest: $1 still connected" >&2
            return 1
        fi
    done
    set -x
}

# drop_caches: nothing the kernel read before is served from its page cache
drop_caches() {
    sync
    echo 3 > /proc/sys/vm/drop_caches
}

# sha FILE: sha256 of a file or a whole device
# sha DEVICE SKIP COUNT: sha256 of COUNT MiB from MiB SKIP, read with O_DIRECT
sha() {
    { set +x; } 2>/dev/null
    if [ $# -eq 1 ]; then
        sha256sum < "$1" | cut -d' ' -f1
    else
        dd if="$1" bs=1M skip="$2" count="$3" iflag=direct status=none | sha256sum | cut -d' ' -f1
    fi
}
