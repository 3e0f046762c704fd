#!/usr/bin/env bash
# Install test of the llmd package in a fresh Debian bookworm chroot (debootstrap minbase):
# dpkg -i, check the user, files, conffile and unit; run llmd in the foreground as user llmd
# and check /health and `llmctl status` over the socket (root, a member of group llmd, and a
# non-member who must be refused); reinstall over a modified config (the upgrade path); purge
# and check that only the model store is left.
#
#   sudo packaging/test-install.sh [path/to/llmd_*.deb]    (default: newest in target/debian)
#
# Needs root (chroot, mounts), debootstrap and curl. The minbase chroot is built once and kept
# as a tarball in $LLMD_CI_CACHE (default /var/cache/llmd-ci); later runs unpack it (seconds).
# Mirror: $LLMD_DEBIAN_MIRROR (default: the first Debian mirror in this host's apt sources).
set -euo pipefail

die() { echo "test-install: FAIL: $*" >&2; exit 1; }
step() { echo "test-install: $*"; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ "$(id -u)" -eq 0 ] || die "must run as root (chroot and mounts)"

deb=${1:-}
if [ -z "$deb" ]; then
    deb=$(ls -t "${CARGO_TARGET_DIR:-$repo/target}"/debian/llmd_*.deb 2>/dev/null | head -n1 || true)
    [ -n "$deb" ] || die "no .deb given and none in target/debian: run packaging/build-deb.sh first"
fi
[ -f "$deb" ] || die "$deb: no such file"

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v curl >/dev/null || need+=(curl)
if [ "${#need[@]}" -gt 0 ]; then
    step "installing ${need[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

# --- the cached chroot -------------------------------------------------------------------
suite=bookworm
# The mirror this host's apt already uses (deb822 `URIs:` or one-line `deb` entries).
host_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' "$f"
    done
    if [ -f /etc/apt/sources.list ]; then
        awk '/^deb / && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list
    fi
    return 0
}
mirror=${LLMD_DEBIAN_MIRROR:-$(host_mirror | head -n1)}
[ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources*: set LLMD_DEBIAN_MIRROR"
# systemd-standalone-sysusers satisfies the package's "systemd | systemd-standalone-sysusers"
# dependency without pulling systemd into the chroot. Changing this list renames the cache.
include=systemd-standalone-sysusers
cache=${LLMD_CI_CACHE:-/var/cache/llmd-ci}
tarball="$cache/$suite-minbase-$(echo "$include" | md5sum | cut -c1-8).tar.gz"

work=$(mktemp -d /tmp/llmd-install-test.XXXXXX)
root="$work/root"
mounted=()
daemon_pid=

cleanup() {
    local rc=$?
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -KILL "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" || true
    done
    # Never delete through a mount that is still there (it would be /dev or /proc of the host).
    if grep -q " $work/" /proc/self/mountinfo; then
        echo "test-install: mounts left under $work, not deleting it:" >&2
        grep " $work/" /proc/self/mountinfo >&2
        rc=1
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ ! -f "$tarball" ]; then
    step "building the $suite minbase chroot (once; cached as $tarball)"
    mkdir -p "$cache"
    debootstrap --variant=minbase --include="$include" "$suite" "$work/bootstrap" "$mirror" >"$work/debootstrap.log" 2>&1 ||
        { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    tar -C "$work/bootstrap" -czf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$work/bootstrap"
fi
mkdir "$root"
tar -C "$root" -xzf "$tarball"

mount -t proc proc "$root/proc" && mounted+=("$root/proc")
mount --bind /dev "$root/dev" && mounted+=("$root/dev")

in_root() { chroot "$root" "$@"; }
# Runs a command in the chroot as USER with that user's groups (as login would).
as_user() { local user=$1; shift; chroot "$root" setpriv --reuid="$user" --regid="$user" --init-groups -- "$@"; }

# --- install -----------------------------------------------------------------------------
step "dpkg -i $(basename "$deb")"
cp "$deb" "$root/tmp/llmd.deb"
in_root dpkg -i /tmp/llmd.deb >"$work/install.log" 2>&1 || { cat "$work/install.log" >&2; die "dpkg -i failed"; }
grep -q "sudo usermod -aG llmd" "$work/install.log" || die "postinst did not tell how to join group llmd"

step "user, group, files, conffile, unit"
in_root getent passwd llmd | grep -q '^llmd:x:[0-9]*:[0-9]*:[^:]*:/var/lib/llmd:/usr/sbin/nologin$' ||
    die "user llmd missing or wrong: $(in_root getent passwd llmd || true)"
uid=$(in_root id -u llmd)
[ "$uid" -lt 1000 ] || die "llmd is not a system user (uid $uid)"
in_root getent group llmd >/dev/null || die "group llmd missing"
[ "$(in_root id -gn llmd)" = llmd ] || die "llmd's primary group is not llmd"
in_root id -Gn llmd | tr ' ' '\n' | grep -qx video || die "llmd is not in group video (/dev/nvidia* on some drivers)"

for f in /usr/bin/llmd /usr/bin/llmctl /usr/lib/systemd/system/llmd.service \
    /usr/lib/sysusers.d/llmd.conf /etc/llmd/llmd.toml /usr/share/dbus-1/system.d/org.llmd.Daemon1.conf \
    /usr/share/man/man8/llmd.8.gz /usr/share/man/man1/llmctl.1.gz \
    /usr/share/bash-completion/completions/llmctl /usr/share/zsh/vendor-completions/_llmctl \
    /usr/share/fish/vendor_completions.d/llmctl.fish /usr/share/doc/llmd/changelog.Debian.gz \
    /usr/share/doc/llmd/copyright; do
    [ -f "$root$f" ] || die "$f not installed"
done
[ -x "$root/usr/bin/llmd" ] && [ -x "$root/usr/bin/llmctl" ] || die "binaries not executable"
in_root dpkg-query -W -f='${Conffiles}\n' llmd | grep -q '^ /etc/llmd/llmd.toml [0-9a-f]\{32\}$' ||
    die "/etc/llmd/llmd.toml is not a conffile"
cmp -s "$root/usr/lib/systemd/system/llmd.service" "$repo/systemd/llmd.service" || die "installed unit differs from systemd/llmd.service"
[ -L "$root/etc/systemd/system/multi-user.target.wants/llmd.service" ] || die "llmd.service not enabled by postinst"
# The shipped config must be valid as shipped (exit 78 otherwise).
as_user llmd /usr/bin/llmd --config /etc/llmd/llmd.toml --print-config >/dev/null || die "the shipped /etc/llmd/llmd.toml does not load"

# --- run it ------------------------------------------------------------------------------
# What systemd's RuntimeDirectory=/StateDirectory=/CacheDirectory= would create.
install -d -o "$uid" -g "$(in_root getent group llmd | cut -d: -f3)" -m 0750 \
    "$root/run/llmd" "$root/var/lib/llmd" "$root/var/cache/llmd"
# A model store with a file in it, and some other state: purge must keep the first only.
install -d -o "$uid" -m 0750 "$root/var/lib/llmd/models/models--ci--kept"
echo "not a real model" >"$root/var/lib/llmd/models/models--ci--kept/marker"
echo "state" >"$root/var/lib/llmd/other-state"

port=
for _ in $(seq 50); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then port=$p; break; fi
done
[ -n "$port" ] || die "no free port found"
cat >"$root/etc/llmd/ci.toml" <<EOF
# Written by packaging/test-install.sh; purge must remove it with the rest of /etc/llmd.
[server]
listen = "127.0.0.1:$port"
[control]
socket = "/run/llmd/llmd.sock"
dbus = "off"
[storage]
models_dir = "/var/lib/llmd/models"
offline = true
[engine]
device = "cpu"
[log]
target = "stderr"
EOF

step "llmd in the foreground as user llmd, HTTP on 127.0.0.1:$port"
# Not through as_user: a backgrounded function would be a subshell, and $! must be llmd itself
# (chroot and setpriv exec into it) so that the SIGTERM below reaches the daemon.
chroot "$root" setpriv --reuid=llmd --regid=llmd --init-groups -- \
    /usr/bin/llmd --config /etc/llmd/ci.toml >"$work/llmd.log" 2>&1 &
daemon_pid=$!
# /health answers 200 once a model is served; with none configured (as here) a ready daemon
# answers 503 {"status":"no_model","phase":"ready"}. Either way the phase must reach "ready".
health=
for _ in $(seq 100); do
    kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/llmd.log" >&2; die "llmd exited during start"; }
    health=$(curl -sS --max-time 2 -w ' HTTP %{http_code}' "http://127.0.0.1:$port/health" 2>/dev/null) || health=
    case "$health" in *'"phase":"ready"'*) break ;; esac
    sleep 0.2
done
case "$health" in
*'"phase":"ready"'*' HTTP 200' | *'"status":"no_model"'*' HTTP 503') ;;
*) cat "$work/llmd.log" >&2; die "/health did not report ready: '$health'" ;;
esac
step "/health: $health"
# stat in the chroot: names resolve through the chroot's /etc/passwd, not the host's.
sock_mode=$(in_root stat -c '%a %U %G' /run/llmd/llmd.sock)
[ "$sock_mode" = "660 llmd llmd" ] || die "socket mode/owner: $sock_mode, want 660 llmd llmd"

step "llmctl status as root, as a member of group llmd, as a non-member"
in_root useradd --create-home --user-group alice
in_root usermod -aG llmd alice
in_root useradd --create-home --user-group bob
in_root llmctl status >"$work/status-root.txt" 2>&1 || { cat "$work/status-root.txt" >&2; die "llmctl status as root failed"; }
as_user alice llmctl status --json >"$work/status-alice.json" 2>&1 ||
    { cat "$work/status-alice.json" >&2; die "llmctl status as a member of group llmd failed"; }
grep -q "127.0.0.1:$port" "$work/status-alice.json" || die "status does not show the HTTP address: $(cat "$work/status-alice.json")"
rc=0
as_user bob llmctl status >"$work/status-bob.txt" 2>&1 || rc=$?
[ "$rc" -eq 3 ] && grep -q "group llmd" "$work/status-bob.txt" ||
    die "a non-member should get exit 3 and the 'group llmd' hint, got $rc: $(cat "$work/status-bob.txt")"

step "SIGTERM: clean exit, socket removed"
kill -TERM "$daemon_pid"
rc=0
wait "$daemon_pid" || rc=$?
daemon_pid=
[ "$rc" -eq 0 ] || { cat "$work/llmd.log" >&2; die "llmd exited $rc on SIGTERM"; }
[ ! -e "$root/run/llmd/llmd.sock" ] || die "socket left behind after exit"

# --- upgrade path ------------------------------------------------------------------------
step "reinstall over a changed config (the upgrade path): config and models kept"
echo "# changed by the admin" >>"$root/etc/llmd/llmd.toml"
in_root dpkg -i /tmp/llmd.deb >"$work/upgrade.log" 2>&1 || { cat "$work/upgrade.log" >&2; die "reinstall failed"; }
tail -n1 "$root/etc/llmd/llmd.toml" | grep -q "changed by the admin" || die "upgrade replaced the admin's config"
[ -f "$root/var/lib/llmd/models/models--ci--kept/marker" ] || die "upgrade lost the models"

# --- purge -------------------------------------------------------------------------------
step "dpkg --purge: config and state gone, models kept"
in_root dpkg --purge llmd >"$work/purge.log" 2>&1 || { cat "$work/purge.log" >&2; die "purge failed"; }
grep -q "kept the downloaded models in /var/lib/llmd/models" "$work/purge.log" || die "purge did not say where the models are: $(cat "$work/purge.log")"
for gone in /etc/llmd /var/cache/llmd /var/lib/llmd/other-state /usr/bin/llmd /usr/bin/llmctl \
    /usr/lib/systemd/system/llmd.service /etc/systemd/system/multi-user.target.wants/llmd.service; do
    [ ! -e "$root$gone" ] && [ ! -L "$root$gone" ] || die "$gone left after purge"
done
left=$(cd "$root/var/lib/llmd" && find . -mindepth 1 | sort | tr '\n' ' ')
[ "$left" = "./models ./models/models--ci--kept ./models/models--ci--kept/marker " ] ||
    die "after purge /var/lib/llmd should hold only the models, holds: $left"

step "purge with LLMD_PURGE_MODELS=1 removes the models too"
in_root dpkg -i /tmp/llmd.deb >"$work/install2.log" 2>&1 || { cat "$work/install2.log" >&2; die "second install failed"; }
in_root env LLMD_PURGE_MODELS=1 dpkg --purge llmd >"$work/purge2.log" 2>&1 || { cat "$work/purge2.log" >&2; die "second purge failed"; }
[ ! -e "$root/var/lib/llmd" ] || die "/var/lib/llmd left after a purge with LLMD_PURGE_MODELS=1"

step "PASS"
