# Sourced by scripts/test and scripts/demo: install what metaproxy and its tests need.
# Idempotent; safe to run again.

SYSTEM_PACKAGES=(
  haproxy        # the haproxy engine and its tests
  curl           # instance-side requests in namespace tests
  iproute2       # ip netns / veth for system tests and the demo
  cloud-init     # real guest clients for the metadata server tests
  nginx-light    # static backend for the front benchmark
  wrk            # load generator for the benchmarks
  procps psmisc  # ps/pgrep/fuser used by tests to check nothing is left behind
  sqlite3        # inspecting the store in tests
  systemd        # systemd-analyze verify for the units in contrib/ (already on most hosts)
  python3        # Debian's python, which runs cloud-init's readers
  python3-venv
)

setup_system_packages() {
  local missing=()
  for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
      echo "missing system packages: ${missing[*]} (run as root to install them)" >&2
      return 1
    fi
    echo "== apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # The packaged services are not ours to run: tests start their own instances.
  systemctl disable --now haproxy nginx >/dev/null 2>&1 || true
}

setup_venv() {
  local py=${PYTHON:-python3}
  if [[ ! -x .venv/bin/python ]]; then
    echo "== creating .venv with $py"
    "$py" -m venv .venv
  fi
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
}
