# Shared by scripts/test and scripts/deploy. Sourced, not executed.

# Packages the test suite needs on the host. Daemons are installed only for their
# validators and must never start here: the test containers share the host's ports.
HOST_PACKAGES=(
    python3 python3-venv ca-certificates openssl curl
    debootstrap systemd-container zstd sslscan nftables iproute2
    postfix dovecot-core dovecot-imapd dovecot-lmtpd dovecot-auth-lua
    nginx-light libnginx-mod-stream unbound nsd opendkim opendkim-tools lua5.4 lua-socket
    chromium fonts-dejavu-core
    gcc libc6-dev python3-dev   # Salt's dependency timelib has no wheel: built from source
)

require_root_debian() {
    if [ "$(id -u)" != 0 ]; then
        echo "error: run this as root (it installs packages and boots containers)" >&2
        exit 2
    fi
    if ! grep -qsE '^(ID|ID_LIKE)=.*debian' /etc/os-release; then
        echo "error: this needs a Debian-family host (found: $(. /etc/os-release; echo "$PRETTY_NAME"))" >&2
        exit 2
    fi
}

install_host_packages() {
    local missing=()
    for pkg in "${HOST_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing host packages: ${missing[*]}"
    local policy=/usr/sbin/policy-rc.d created_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod +x "$policy"
        created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    [ -n "$created_policy" ] && rm -f "$policy"
    # A host with an init system may have started them anyway: stop them.
    for svc in postfix dovecot nginx unbound nsd opendkim; do
        service "$svc" stop >/dev/null 2>&1 || true
    done
}

ensure_venv() {
    local stamp=.venv/.installed-from
    local want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ ! -x .venv/bin/python ]; then
        /usr/bin/python3 -m venv .venv
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        .venv/bin/pip install -q --upgrade pip >/dev/null
        .venv/bin/pip install -q -e '.[test]'
        echo "$want" > "$stamp"
    fi
}
