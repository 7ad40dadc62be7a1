#!/usr/bin/env bash
# Installs progressd as a socket-activated systemd service:
#   binary    /usr/local/bin/progressd
#   units     /etc/systemd/system/progressd.{service,socket}
#   settings  /etc/progressd/progressd.env (kept if it exists)
# Run from a checkout, as root: deploy/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked
install -D -m 0755 target/release/progressd /usr/local/bin/progressd
install -D -m 0644 deploy/progressd.service /etc/systemd/system/progressd.service
install -D -m 0644 deploy/progressd.socket /etc/systemd/system/progressd.socket
if [ ! -e /etc/progressd/progressd.env ]; then
    install -D -m 0644 deploy/progressd.env /etc/progressd/progressd.env
fi

systemctl daemon-reload
systemctl enable --now progressd.socket
systemctl restart progressd.service
systemctl --no-pager status progressd.service
