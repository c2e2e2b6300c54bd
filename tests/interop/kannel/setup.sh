#!/usr/bin/env bash
# Installs Kannel (Debian's `kannel` package: bearerbox and smsbox in /usr/sbin) for the interop
# tests and benchmarks, and makes sure Debian's own Kannel service is stopped and stays disabled.
# Idempotent: run it as often as you like (as root, or with sudo available).
#
# The harness (tests/src/kannel.rs, run.sh) never uses the service: it runs its own bearerbox and
# smsbox in the foreground, with its own config (kannel.conf.in) in its own temporary directory,
# on free loopback ports. The service is stopped anyway because its /etc/kannel/kannel.conf
# holds ports (admin 13000, wapbox 13002, WAP UDP 9200-9208) and CPU we would rather not share
# with a benchmark. The package ships only a SysV init script (/etc/init.d/kannel, which starts
# bearerbox and wapbox); on systemd hosts it runs through systemd's SysV generator.
set -euo pipefail

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    SUDO="sudo"
fi

if ! command -v bearerbox >/dev/null && ! [[ -x /usr/sbin/bearerbox ]]; then
    echo "== installing kannel" >&2
    $SUDO apt-get update -qq >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends kannel >&2
fi

if [[ -e /etc/init.d/kannel ]]; then
    if [[ -d /run/systemd/system ]]; then
        # systemd is running: stop the unit its SysV generator made and keep it from booting.
        $SUDO systemctl stop kannel.service 2>/dev/null || true
        $SUDO systemctl disable kannel.service >/dev/null 2>&1 || true
    else
        # No systemd (a container, say): stop what the init script started, if anything.
        if compgen -G "/var/run/kannel/kannel_*.pid" >/dev/null; then
            $SUDO /etc/init.d/kannel stop >&2 || true
        fi
        $SUDO update-rc.d kannel disable >/dev/null 2>&1 || true
    fi
fi

BEARERBOX=$(command -v bearerbox || echo /usr/sbin/bearerbox)
echo "kannel ready: $BEARERBOX ($(dpkg-query -W -f '${Version}' kannel 2>/dev/null || echo 'version unknown'))"
