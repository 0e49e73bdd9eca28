#!/usr/bin/env bash
# Install qcgate as a systemd service from this checkout. Idempotent: run it again to upgrade.
#
#   sudo deploy/install.sh                      # the real system
#   deploy/install.sh --root /tmp/fake --no-user --no-systemctl   # a fake root, for tests
#
# What it does (every path below is prefixed with --root when given):
#   - creates the `qcgate` system user and group (unless --no-user);
#   - /opt/qcgate/venv: a Python 3.11 virtual environment with qcgate installed from this checkout
#     (a copy of it, so the checkout is never written to); /opt/qcgate/models: the threshold models;
#   - /etc/qcgate/qcgate.toml from deploy/qcgate.example.toml, only if absent (an existing
#     configuration is never overwritten; the new example goes next to it as qcgate.toml.example);
#   - /var/lib/qcgate, owned by qcgate, mode 0750 (the spool and the embedded database);
#   - /etc/systemd/system/qcgate.service and qcgate-retention.{service,timer}, then
#     `systemctl daemon-reload` and `enable` (unless --no-systemctl). It does not start the service: review the configuration first.
#
# Options:
#   --root DIR        install under DIR instead of / (the unit's paths then point into DIR too,
#                     so `systemd-analyze verify` can check it there)
#   --no-user         do not create the system user (and do not chown)
#   --no-systemctl    do not call systemctl
#   --python PY       the interpreter for the virtual environment (default: python3.11)
#   --pip-args "..."  extra arguments for pip install (e.g. "--no-index --find-links /srv/wheels"
#                     on a machine without internet access)
set -euo pipefail

ROOT=""
MAKE_USER=1
USE_SYSTEMCTL=1
PYTHON=python3.11
PIP_ARGS=""
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
        --no-user) MAKE_USER=0; shift ;;
        --no-systemctl) USE_SYSTEMCTL=0; shift ;;
        --python) PYTHON="$2"; shift 2 ;;
        --pip-args) PIP_ARGS="$2"; shift 2 ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

PREFIX="$ROOT/opt/qcgate"
CONF_DIR="$ROOT/etc/qcgate"
STATE_DIR="$ROOT/var/lib/qcgate"
UNIT_DIR="$ROOT/etc/systemd/system"
VENV="$PREFIX/venv"

say() { echo "install.sh: $*"; }

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || { echo "install.sh: $PYTHON is not Python 3.11 (qcgate needs 3.11)" >&2; exit 2; }

# 1. The service account: no login shell, home is the state directory.
if [ "$MAKE_USER" = 1 ]; then
    if ! getent passwd qcgate >/dev/null; then
        useradd --system --user-group --home-dir /var/lib/qcgate --no-create-home --shell /usr/sbin/nologin qcgate
        say "created system user qcgate"
    fi
fi

# 2. Directories.
install -d -m 0755 "$PREFIX" "$UNIT_DIR"
install -d -m 0755 "$CONF_DIR"
install -d -m 0750 "$STATE_DIR"
if [ "$MAKE_USER" = 1 ]; then
    chown qcgate:qcgate "$STATE_DIR"
    chown root:qcgate "$CONF_DIR"
fi

# 3. The virtual environment, from a copy of the checkout (pip builds in the source tree otherwise).
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    say "created $VENV"
fi
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
tar -C "$SOURCE" --exclude=./.git --exclude=./.venv --exclude=./var --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=./build -cf - pyproject.toml README.md qcgate | tar -C "$BUILD" -xf -
# shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
"$VENV/bin/pip" install --quiet --disable-pip-version-check $PIP_ARGS "$BUILD"
say "installed qcgate $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("qcgate"))') into $VENV"

# 4. Models and documentation next to the venv (the unit points QCGATE_MODELS_DIR here).
rm -rf "$PREFIX/models.new"
cp -a "$SOURCE/models" "$PREFIX/models.new"
rm -rf "$PREFIX/models"
mv "$PREFIX/models.new" "$PREFIX/models"
install -m 0644 "$SOURCE/README.md" "$PREFIX/README.md"
[ -f "$SOURCE/docs/OPERATIONS.md" ] && install -m 0644 "$SOURCE/docs/OPERATIONS.md" "$PREFIX/OPERATIONS.md"

# 5. Configuration: never overwrite the operator's file.
if [ -f "$CONF_DIR/qcgate.toml" ]; then
    install -m 0644 "$SOURCE/deploy/qcgate.example.toml" "$CONF_DIR/qcgate.toml.example"
    say "kept $CONF_DIR/qcgate.toml; the current example is $CONF_DIR/qcgate.toml.example"
else
    install -m 0640 "$SOURCE/deploy/qcgate.example.toml" "$CONF_DIR/qcgate.toml"
    say "wrote $CONF_DIR/qcgate.toml from the example: review it before starting"
fi
[ "$MAKE_USER" = 1 ] && chown root:qcgate "$CONF_DIR/qcgate.toml"

# 6. The unit. Under --root its absolute paths are moved into the root, so that the unit can be
#    verified there (`systemd-analyze verify` checks that ExecStart exists).
for unit in qcgate.service qcgate-retention.service qcgate-retention.timer; do
    if [ -n "$ROOT" ]; then
        sed -e "s#/opt/qcgate#$PREFIX#g" -e "s#/etc/qcgate#$CONF_DIR#g" "$SOURCE/systemd/$unit" > "$UNIT_DIR/$unit"
        chmod 0644 "$UNIT_DIR/$unit"
    else
        install -m 0644 "$SOURCE/systemd/$unit" "$UNIT_DIR/$unit"
    fi
    say "installed $UNIT_DIR/$unit"
done

# 7. Check the configuration with the installed code (skipped when pip ran without dependencies).
if "$VENV/bin/python" -c 'import qcgate.config, pydantic' 2>/dev/null; then
    QCGATE_MODELS_DIR="$PREFIX/models" "$VENV/bin/qcgate" check-config "$CONF_DIR/qcgate.toml"  # as the unit sets it
else
    say "skipped check-config: the environment has no dependencies installed ($PIP_ARGS)"
fi

if [ "$USE_SYSTEMCTL" = 1 ]; then
    systemctl daemon-reload
    systemctl enable qcgate.service qcgate-retention.timer
    say "enabled qcgate.service; start it with: systemctl start qcgate && journalctl -u qcgate -f"
fi
say "done"
