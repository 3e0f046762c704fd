#!/usr/bin/env bash
# Checks systemd/llmd.service as the package installs it:
#   1. every directive issue 10 asks for is present (so none is dropped by accident);
#   2. `systemd-analyze security --offline=yes` exposure is at most $LLMD_MAX_EXPOSURE (2.5);
#   3. `systemd-analyze verify` prints nothing, run against the unit with the package's
#      /usr/bin/llmd and man pages in place: the .deb's /usr is overlaid on the host's /usr in a
#      private mount namespace, so the host is not touched.
#
#   sudo packaging/check-unit.sh [path/to/llmd_*.deb]    (default: newest in target/debian)
#
# Needs systemd-analyze (apt-get install systemd), man (man-db), and root for step 3
# (unshare -m, overlay mount).
set -euo pipefail

die() { echo "check-unit: FAIL: $*" >&2; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
unit="$repo/systemd/llmd.service"
max_exposure=${LLMD_MAX_EXPOSURE:-2.5}
command -v systemd-analyze >/dev/null || die "systemd-analyze missing (apt-get install -y systemd)"

# --- 1. required directives --------------------------------------------------------------
required=(
    "Type=notify" "NotifyAccess=main" "Restart=on-failure" "User=llmd" "Group=llmd"
    "RuntimeDirectory=llmd" "RuntimeDirectoryMode=0750" "StateDirectory=llmd" "CacheDirectory=llmd"
    "ConfigurationDirectory=llmd" "ProtectSystem=strict" "ProtectHome=yes" "PrivateTmp=yes"
    "PrivateDevices=no" "DevicePolicy=closed" "DeviceAllow=char-nvidiactl rw"
    "DeviceAllow=char-nvidia-uvm rw" "DeviceAllow=char-nvidia-caps rw" "DeviceAllow=char-nvidia-frontend rw"
    "NoNewPrivileges=yes" "MemoryDenyWriteExecute=yes" "SystemCallFilter=@system-service"
    "CapabilityBoundingSet=" "ExecReload=/bin/kill -HUP \$MAINPID" "UMask=0027"
)
for line in "${required[@]}"; do
    grep -qxF -- "$line" "$unit" || die "$unit lacks '$line'"
done
grep -qx 'WatchdogSec=[1-9][0-9]*' "$unit" || die "$unit lacks WatchdogSec="
grep -qx 'TimeoutStartSec=[0-9]*min' "$unit" || die "$unit lacks a TimeoutStartSec= in minutes"
after=$(sed -n 's/^After=//p' "$unit")
for dep in network-online.target nvidia-persistenced.service nvidia-fabricmanager.service; do
    [[ " $after " == *" $dep "* ]] || die "$unit: After= lacks $dep"
done
echo "check-unit: required directives present"

# --- 2. exposure -------------------------------------------------------------------------
report=$(systemd-analyze security --offline=yes "$unit" 2>&1) || true
exposure=$(echo "$report" | sed -n 's/.*Overall exposure level for llmd.service: \([0-9.]*\).*/\1/p')
[ -n "$exposure" ] || { echo "$report" >&2; die "no exposure level in systemd-analyze security's output"; }
awk -v e="$exposure" -v m="$max_exposure" 'BEGIN { exit !(e <= m) }' ||
    { echo "$report" | grep '✗' >&2; die "exposure $exposure is above $max_exposure (the ✗ lines above)"; }
echo "check-unit: systemd-analyze security exposure $exposure (at most $max_exposure)"

# --- 3. verify, with the package's files in place ----------------------------------------
deb=${1:-}
if [ -z "$deb" ]; then
    deb=$(ls -t "${CARGO_TARGET_DIR:-$repo/target}"/debian/llmd_*.deb 2>/dev/null | head -n1 || true)
    [ -n "$deb" ] || die "no .deb given and none in target/debian: run packaging/build-deb.sh first"
fi
[ "$(id -u)" -eq 0 ] || die "step 3 needs root (mount namespace and overlay)"
command -v man >/dev/null || die "man missing (apt-get install -y man-db): verify checks the Documentation= man pages"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$deb" "$tmp/pkg"
cmp -s "$tmp/pkg/usr/lib/systemd/system/llmd.service" "$unit" || die "the unit in $deb differs from $unit: rebuild the package"

# In the private namespace the package's /usr lies over the host's (read-only overlay), so
# /usr/bin/llmd and /usr/share/man/man8/llmd.8.gz exist exactly as installed.
out=$(unshare -m --propagation private sh -c '
    mount -t overlay overlay -o "lowerdir=$1/usr:/usr" /usr &&
    systemd-analyze verify /usr/lib/systemd/system/llmd.service 2>&1' sh "$tmp/pkg") ||
    { echo "$out" >&2; die "systemd-analyze verify failed"; }
[ -z "$out" ] || { echo "$out" >&2; die "systemd-analyze verify printed the lines above"; }
echo "check-unit: systemd-analyze verify: clean"
echo "check-unit: PASS"
