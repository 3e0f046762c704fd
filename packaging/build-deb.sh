#!/usr/bin/env bash
# Builds the llmd Debian package: release binaries, man pages and completions generated from the
# clap definitions, then dpkg-deb. Prints the path of the .deb on the last line.
#
#   packaging/build-deb.sh
#
# Environment:
#   LLMD_CUDA=1        build llmd with `--features cuda`: needs nvcc on PATH or the toolchain of
#                      scripts/setup-cuda-toolchain.sh (its cuda-env.sh is sourced). The binary
#                      loads libcuda/NVML at run time, so it also runs on hosts without GPUs.
#                      This is the build that is shipped. Default 0: the CPU-only build, which
#                      needs no CUDA toolchain (CI).
#   LLMD_PROFILE=dev   package the dev-profile binaries instead of release ones (CI: reuses the
#                      build of `cargo test --workspace` instead of a second, ~9-minute release
#                      build; the package is the same apart from speed). Default: release.
#   LLMD_PREBUILT=1    package the binaries already in the profile's target folder without running
#                      cargo build (CI, right after `cargo test --workspace` built them: a second
#                      build of the two packages alone re-resolves features and recompiles).
#   LLMD_DEB_OUT=DIR   where the .deb goes (default: <target dir>/debian).
#   LLMD_LINTIAN=0     skip lintian (default: run it when installed; any error or warning fails).
#   CARGO_TARGET_DIR   honoured as by cargo.
# Needs: cargo, dpkg-deb and dpkg-shlibdeps (apt-get install dpkg-dev), strip (binutils), gzip.
set -euo pipefail

die() { echo "build-deb: $*" >&2; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
pkg_dir=packaging/debian
target_dir=${CARGO_TARGET_DIR:-$repo/target}
out_dir=${LLMD_DEB_OUT:-$target_dir/debian}
cuda=${LLMD_CUDA:-0}
profile=${LLMD_PROFILE:-release}
case "$profile" in
release) profile_flag=(--release); profile_dir=release ;;
dev) profile_flag=(); profile_dir=debug ;;
*) die "LLMD_PROFILE must be release or dev, not '$profile'" ;;
esac

for tool in cargo dpkg-deb dpkg-shlibdeps dpkg-parsechangelog strip gzip; do
    command -v "$tool" >/dev/null || die "missing $tool (apt-get install -y dpkg-dev binutils gzip; cargo from rustup)"
done

# One version everywhere: the workspace version must be the upstream part of the newest
# changelog entry, whose Debian revision (-1, -2, ...) completes the package version.
crate_version=$(cargo pkgid -p llmd | sed 's/.*[#@]//')
deb_version=$(dpkg-parsechangelog -l "$pkg_dir/changelog" -S Version)
[ "${deb_version%-*}" = "$crate_version" ] ||
    die "packaging/debian/changelog's newest entry is $deb_version but the workspace version is $crate_version: add a changelog entry ($crate_version-1)"
arch=$(dpkg --print-architecture)

features=()
case "$cuda" in
0) variant="CPU-only build (LLMD_CUDA=0)" ;;
1)
    variant="CUDA build (LLMD_CUDA=1)"
    if ! command -v nvcc >/dev/null; then
        # scripts/setup-cuda-toolchain.sh installs nvcc into a venv and writes this file.
        cuda_env=${CUDA_VENV:-$HOME/.cache/llmd-cuda13}/cuda-env.sh
        [ -f "$cuda_env" ] || die "LLMD_CUDA=1 needs nvcc (not on PATH, no $cuda_env): run scripts/setup-cuda-toolchain.sh"
        # shellcheck source=/dev/null
        . "$cuda_env"
        command -v nvcc >/dev/null || die "$cuda_env did not put nvcc on PATH: re-run scripts/setup-cuda-toolchain.sh"
    fi
    features=(--features llmd/cuda)
    ;;
*) die "LLMD_CUDA must be 0 or 1, not '$cuda'" ;;
esac

echo "build-deb: llmd $deb_version ($arch), $variant"
if [ "${LLMD_PREBUILT:-0}" = 1 ]; then
    for bin in llmd llmctl; do
        [ -x "$target_dir/$profile_dir/$bin" ] || die "LLMD_PREBUILT=1 but $target_dir/$profile_dir/$bin is missing: build it first"
    done
else
    cargo build "${profile_flag[@]}" --locked -p llmd -p llmctl "${features[@]}"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gen="$work/gen"
root="$work/root"

# Man pages and completions straight from the binaries' clap definitions (packaging/gen).
cargo run --quiet --locked -p llmd-packaging-gen -- "$gen" >/dev/null

# --- the file tree -----------------------------------------------------------------------
install -d "$root/DEBIAN"
# dh_strip's flags: drop symbols and the build notes; the binaries carry no debug info.
for bin in llmd llmctl; do
    install -D -m 0755 "$target_dir/$profile_dir/$bin" "$root/usr/bin/$bin"
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/$bin"
done
install -D -m 0644 systemd/llmd.service "$root/usr/lib/systemd/system/llmd.service"
install -D -m 0644 systemd/llmd.sysusers "$root/usr/lib/sysusers.d/llmd.conf"
install -D -m 0644 etc/llmd.toml "$root/etc/llmd/llmd.toml"
install -D -m 0644 etc/dbus-1/system.d/org.llmd.Daemon1.conf \
    "$root/usr/share/dbus-1/system.d/org.llmd.Daemon1.conf"

for page in "$gen"/man/*; do
    section=${page##*.}
    install -D -m 0644 "$page" "$root/usr/share/man/man$section/$(basename "$page")"
    gzip -9n "$root/usr/share/man/man$section/$(basename "$page")"
done
for bin in llmd llmctl; do
    install -D -m 0644 "$gen/completions/bash/$bin" "$root/usr/share/bash-completion/completions/$bin"
    install -D -m 0644 "$gen/completions/zsh/_$bin" "$root/usr/share/zsh/vendor-completions/_$bin"
    install -D -m 0644 "$gen/completions/fish/$bin.fish" "$root/usr/share/fish/vendor_completions.d/$bin.fish"
done

doc="$root/usr/share/doc/llmd"
install -d "$doc"
gzip -9nc "$pkg_dir/changelog" >"$doc/changelog.Debian.gz"
chmod 0644 "$doc/changelog.Debian.gz"
# The binaries link their Rust dependencies statically: name each with its licence.
{
    cat "$pkg_dir/copyright.in"
    echo
    echo "Files: usr/bin/*"
    echo "Copyright: 2025 llmd developers, and the authors of the Rust crates listed below"
    echo "License: Apache-2.0"
    echo "Comment: llmd and llmctl are statically linked with these crates (name version: licence"
    echo " as declared by the crate):"
    cargo tree --locked -p llmd -p llmctl "${features[@]}" -e normal,build --prefix none \
        --format '{p}: {l}' |
        sed -e 's/ (.*)//' -e 's/ (\*)$//' | grep -v '^llmd\|^llmctl' | sort -u | sed 's/^/ /'
} >"$doc/copyright"
chmod 0644 "$doc/copyright"
install -D -m 0644 "$pkg_dir/lintian-overrides" "$root/usr/share/lintian/overrides/llmd"

# --- control files ------------------------------------------------------------------------
install -m 0755 "$pkg_dir/postinst" "$pkg_dir/prerm" "$pkg_dir/postrm" "$root/DEBIAN/"
echo /etc/llmd/llmd.toml >"$root/DEBIAN/conffiles"

# Shared-library dependencies as dpkg-shlibdeps computes them (libc6, libgcc-s1); it insists
# on a debian/control, so it runs in a scratch source tree.
mkdir -p "$work/src/debian"
printf 'Source: llmd\n\nPackage: llmd\nArchitecture: any\n' >"$work/src/debian/control"
shlibs=$(cd "$work/src" && dpkg-shlibdeps -O "$root/usr/bin/llmd" "$root/usr/bin/llmctl" 2>/dev/null |
    sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || die "dpkg-shlibdeps found no dependencies for the binaries"

installed_kib=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
maintainer=$(sed -n 's/^ -- \(.*>\)  .*/\1/p' "$pkg_dir/changelog" | head -n1)
cat >"$root/DEBIAN/control" <<EOF
Package: llmd
Version: $deb_version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_kib
Depends: $shlibs, systemd | systemd-standalone-sysusers | systemd-sysusers
Recommends: default-dbus-system-bus | dbus-system-bus
Section: net
Priority: optional
Homepage: https://github.com/llmd/llmd
Description: LLM inference server with an OpenAI-compatible HTTP API
 llmd is a system service that downloads large language models from Hugging
 Face or ModelScope, places them on the host's NVIDIA GPUs (or the CPU) and
 serves them over the OpenAI HTTP API, with continuous batching, paged KV
 cache and prefix caching.
 .
 llmctl controls the daemon over a Unix socket (members of group llmd):
 load, unload, pull and list models, watch GPUs, check the host. The daemon
 also offers its control interface on the D-Bus system bus.
EOF

(cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"

mkdir -p "$out_dir"
deb="$out_dir/llmd_${deb_version}_${arch}.deb"
# --root-owner-group: every file root:root without fakeroot.
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null

if [ "${LLMD_LINTIAN:-1}" != 0 ]; then
    if command -v lintian >/dev/null; then
        echo "build-deb: lintian"
        lintian --fail-on error,warning --info "$deb"
    else
        echo "build-deb: lintian not installed, skipped (apt-get install -y lintian)" >&2
    fi
fi

echo "$deb"
