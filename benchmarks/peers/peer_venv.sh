# Sourced by the install_*.sh scripts: a peer's own venv outside the repo, installed once per version.
#
# peer_venv NAME VERSION: sets VENV and STAMP; if that version is installed already, prints the venv's
#   python and exits; else creates the venv (the caller then installs into it).
# peer_venv_done: marks the version installed and prints the venv's python.
# Env: LOOM_PEERS_DIR (default ~/.cache/loom/peers), PYTHON (default python3.11 or python3).

peer_venv() {
    local dir="${LOOM_PEERS_DIR:-$HOME/.cache/loom/peers}/$1"
    local py="${PYTHON:-python3.11}"
    command -v "$py" >/dev/null || py=python3
    VENV="$dir/venv"
    STAMP="$VENV/.loom-$1-$2"
    if [[ -f "$STAMP" ]]; then
        echo "$VENV/bin/python"
        exit 0
    fi
    mkdir -p "$dir"
    [[ -x "$VENV/bin/python" ]] || "$py" -m venv "$VENV"
}

peer_venv_done() {
    touch "$STAMP"
    echo "$VENV/bin/python"
}
