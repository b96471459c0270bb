#!/usr/bin/env bash
# Installs the Debian packages the test suite needs: a real OpenSSH server for
# the deploy tests, Dropbear and BusyBox for the tests of devices that are not a stock
# OpenSSH Debian, headless Chromium for the report screenshot test, fish and tcsh
# for the login-shell tests, g++ and chattr for the export tests.
# Idempotent: installs only what is missing.
set -euo pipefail

need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
# Dropbear (with dropbearkey) and BusyBox: a Yocto/OpenWrt-like device, with and without an sftp-server.
[ -x /usr/sbin/dropbear ] && command -v dropbearkey >/dev/null 2>&1 || need+=(dropbear-bin)
[ -x /usr/bin/busybox ] || need+=(busybox)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# Login shells that are not POSIX sh: the SSH wire command must read the same under them.
command -v fish >/dev/null 2>&1 || need+=(fish)
command -v tcsh >/dev/null 2>&1 || need+=(tcsh)
# g++ compiles the exported C/C++ in the export tests; chattr (e2fsprogs) makes a read-only dir for root.
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v chattr >/dev/null 2>&1 || need+=(e2fsprogs)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "error: missing Debian packages: ${need[*]}; run: sudo apt-get install -y ${need[*]}" >&2
    exit 1
fi
echo "installing Debian packages: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
