# Sourced by tests/setup_{vllm,mindspore,megatron019}.sh, from the repository root: each installs
# one real part into its own venv and never fails the caller. On any failure, give_up says why,
# writes the reason to $VENV/UNAVAILABLE (the tests skip with it) and exits 0; ready marks a
# finished install with $VENV/READY (holding $PINS), which a later run reuses.
# Set before sourcing: NAME (for messages), VENV, PINS, TESTS (the tests that need it).
if [ -f "$VENV/READY" ] && [ "$(cat "$VENV/READY")" = "$PINS" ]; then
    echo "$NAME: $VENV already holds $PINS"
    exit 0
fi
LOG=$(mktemp)
give_up() {
    echo "$NAME: $1, $TESTS will skip (last lines of the log below)"
    tail -n 15 "$LOG"
    mkdir -p "$VENV" && echo "$1" > "$VENV/UNAVAILABLE"
    rm -f "$LOG"
    exit 0
}
ready() {
    rm -f "$VENV/UNAVAILABLE" "$LOG"
    echo "$PINS" > "$VENV/READY"
    echo "$NAME: installed $PINS into $VENV in $(( $(date +%s) - START )) s"
    exit 0
}
START=$(date +%s)
rm -rf "$VENV"
