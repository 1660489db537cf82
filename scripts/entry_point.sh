# What the *.sh entry points in the checkout's root share; they source this file.
#   TNAS_REPO     the checkout (this file's parent directory's parent)
#   TNAS_PYTHON   $PYTHON, else python
TNAS_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TNAS_PYTHON="${PYTHON:-python}"

# print_header_on_help WRAPPER [FIRST_ARGUMENT]: for -h/--help, print the wrapper's header comment (its lines
# from the second to `set -euo ...`); the Python script's own --help follows it.
print_header_on_help() {
    case "${2:-}" in -h|--help) sed -n '2,/^set -euo/s/^# \{0,1\}//p' "$1"; echo;; esac
}

# run_demo WRAPPER WHAT OUT SCRIPT [FLAGS...]: run SCRIPT FLAGS --out OUT from the checkout (the demos write
# into its runs/), adding --resume when OUT has a last.pt, so that rerunning a demo finishes it.
run_demo() {
    local wrapper="$1" what="$2" out="$3"
    shift 3
    cd "$TNAS_REPO"
    echo "$wrapper: no arguments, running the CPU demo ($what) into $out"
    set -- "$@" --out "$out"
    if [ -f "$out/last.pt" ]; then
        set -- "$@" --resume
    fi
    exec "$TNAS_PYTHON" "$@"
}

# say_what_runs WRAPPER WHAT [ARGUMENTS...]: one line naming the run and the caller's arguments (none for --help).
say_what_runs() {
    local wrapper="$1" what="$2"
    shift 2
    case "${1:-}" in -h|--help) ;; *) echo "$wrapper: $what with: $*" ;; esac
}
