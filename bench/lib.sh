# Helpers shared by the benchmark scripts; source it after setting `set -euo pipefail`.
# shellcheck shell=bash

script_name="$(basename "$0")"

die() { echo "$script_name: $*" >&2; exit 1; }
log() { echo "==> $*" >&2; }
now_ns() { date +%s%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }
rss_mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k * 1024 / 1e6 }'; }
lines() { wc -l <"$1" | tr -d ' '; }
first_line() { "$@" 2>&1 | head -n1 || true; }

# median N...: the median of the numbers given.
median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 }
        END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# timed LOG TIMEFILE CMD...: runs CMD with output to LOG, peak RSS (KiB) into
# TIMEFILE, prints the wall seconds; exits the script if CMD fails.
timed() {
    local logf="$1" tf="$2" t0 t1 rc=0
    shift 2
    t0="$(now_ns)"
    /usr/bin/time -f '%M' -o "$tf" "$@" >"$logf" 2>&1 || rc=$?
    t1="$(now_ns)"
    if ((rc != 0)); then
        echo "$script_name: command failed (exit $rc): $*" >&2
        echo "--- last lines of $logf:" >&2
        tail -n 20 "$logf" >&2
        exit 1
    fi
    elapsed "$t0" "$t1"
}
