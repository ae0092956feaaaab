#!/usr/bin/env bash
# Measure the `llm_map` stage kind against the mock OpenAI-compatible server
# (examples/mock_openai.rs, a fixed latency per request).
#
#   1. Build anneal and the mock server (release).
#   2. Smoke-test the mock: start it, GET /v1/models and POST one chat
#      completion with curl, check the reply and the request count.
#   3. Generate N JSONL rows and a template in a temp work dir, write a
#      pipeline with one llm_map stage (max_concurrent 64 by default).
#   4. RUNS times: start a fresh mock (random port, --latency-ms, a required
#      API key), run `anneal run -q bench.yaml --force summarize` from a clean
#      state under /usr/bin/time, stop the mock and check it served exactly N
#      requests, all answered 200, and that the output has N rows.
#   5. Report the median wall time, the throughput N / median, the ideal
#      max_concurrent * 1000 / latency_ms req/s and achieved/ideal, peak RSS.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
    cat <<EOF
Usage: bench/llm_map.sh [--mock-only] [--keep] [-h|--help]

Times 'anneal run' of one llm_map stage over N generated rows against the mock
OpenAI-compatible server (examples/mock_openai.rs) with a fixed latency per
request, and compares the throughput with the ideal
max_concurrent * 1000 / latency_ms requests/s.

Options:
  --mock-only   build and smoke-test the mock server (curl), generate the data
                and pipeline, then stop without running anneal
  --keep        keep the work dir (data, pipeline, logs)
  -h, --help    show this help

Environment:
  N               rows, one request each (default: 5000)
  RUNS            timed runs (default: 3)
  LATENCY_MS      mock latency per request, ms (default: 50)
  MAX_CONCURRENT  llm_map max_concurrent (default: 64)
  ANNEAL          anneal binary (default: <repo>/target/release/anneal)
  MOCK            mock server binary
                  (default: <repo>/target/release/examples/mock_openai)
  NO_BUILD=1      do not run 'cargo build --release' first

Writes the report to bench/results/llm_map.md.
EOF
}


# --- options ------------------------------------------------------------------

mock_only=0
keep=0
while (($#)); do
    case "$1" in
        --mock-only) mock_only=1; shift ;;
        --keep) keep=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
n="${N:-5000}"
runs="${RUNS:-3}"
latency="${LATENCY_MS:-50}"
max_concurrent="${MAX_CONCURRENT:-64}"
[[ "$n" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$n'"
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, got '$runs'"
[[ "$latency" =~ ^[0-9]+$ ]] || die "LATENCY_MS must be a non-negative integer, got '$latency'"
[[ "$max_concurrent" =~ ^[1-9][0-9]*$ ]] || die "MAX_CONCURRENT must be a positive integer, got '$max_concurrent'"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
results="$repo/bench/results"

# --- dependencies -------------------------------------------------------------

[[ -x /usr/bin/time ]] || die "/usr/bin/time is required (GNU time: apt-get install time)"
command -v curl >/dev/null || die "curl is required"

if [[ "${NO_BUILD:-0}" != 1 ]]; then
    log "cargo build --release -p anneal --bin anneal --example mock_openai"
    (cd "$repo" && cargo build --release -p anneal --bin anneal --example mock_openai) ||
        die "build failed"
fi
anneal="${ANNEAL:-$repo/target/release/anneal}"
mock="${MOCK:-$repo/target/release/examples/mock_openai}"
[[ -x "$mock" ]] || die "mock server not found or not executable: $mock"
mock="$(cd "$(dirname "$mock")" && pwd)/$(basename "$mock")"
if ((mock_only == 0)); then
    [[ -x "$anneal" ]] || die "anneal binary not found or not executable: $anneal"
    anneal="$(cd "$(dirname "$anneal")" && pwd)/$(basename "$anneal")"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/anneal-bench-llm.XXXXXX")"
mock_pid=""
mock_url=""
served=""
answered=""
cleanup() {
    if [[ -n "$mock_pid" ]]; then
        kill -TERM "$mock_pid" 2>/dev/null || true
        wait "$mock_pid" 2>/dev/null || true
    fi
    if ((keep == 0)); then
        rm -rf "$work"
    else
        log "kept the work dir: $work"
    fi
}
trap cleanup EXIT

# --- helpers ------------------------------------------------------------------

# seconds between two nanosecond timestamps

# start_mock ERRFILE: starts the mock server in the background (mock_pid) and
# sets mock_url; the server's stderr goes to ERRFILE.
start_mock() {
    local errf="$1" urlf="$work/mock.url" i
    rm -f "$urlf"
    "$mock" --latency-ms "$latency" --port 0 --print-url-to "$urlf" \
        --require-key "$MOCK_KEY" >/dev/null 2>"$errf" &
    mock_pid=$!
    for ((i = 0; i < 200; i++)); do
        [[ -s "$urlf" ]] && break
        kill -0 "$mock_pid" 2>/dev/null || die "the mock server exited: $(cat "$errf")"
        sleep 0.05
    done
    [[ -s "$urlf" ]] || die "the mock server did not write its URL within 10 s"
    mock_url="$(cat "$urlf")"
    [[ "$mock_url" =~ ^http://127\.0\.0\.1:[0-9]+/v1$ ]] || die "unexpected mock URL: '$mock_url'"
}

# stop_mock ERRFILE: stops the mock and sets served and answered from the line
# it writes on exit. (Not in a subshell: the mock is a child of this shell.)
stop_mock() {
    local errf="$1" line
    kill -TERM "$mock_pid"
    wait "$mock_pid" || die "the mock server exited with an error: $(cat "$errf")"
    mock_pid=""
    line="$(grep -E '^mock_openai: served [0-9]+ requests' "$errf" | tail -n1)" ||
        die "no request count from the mock server: $(cat "$errf")"
    served="$(sed -E 's/^mock_openai: served ([0-9]+) requests.*/\1/' <<<"$line")"
    answered="$(sed -E 's/.*\(([0-9]+) answered 200\).*/\1/' <<<"$line")"
}


MOCK_KEY="bench-key-$$-$RANDOM"
export MOCK_KEY

# --- 1. smoke test of the mock server -------------------------------------------

log "smoke test of the mock server ($mock)"
start_mock "$work/mock-smoke.err"
models="$(curl -sS --fail -H "Authorization: Bearer $MOCK_KEY" "$mock_url/models")" ||
    die "GET $mock_url/models failed"
[[ "$models" == *'"object":"list"'* ]] || die "unexpected /v1/models reply: $models"
status="$(curl -sS -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer wrong' \
    -H 'Content-Type: application/json' -d '{"model":"m","messages":[{"role":"user","content":"x"}]}' \
    "$mock_url/chat/completions")"
[[ "$status" == 401 ]] || die "a wrong API key got HTTP $status, not 401"
reply="$(curl -sS --fail -H "Authorization: Bearer $MOCK_KEY" -H 'Content-Type: application/json' \
    -d '{"model":"bench-model","messages":[{"role":"user","content":"Summarize: question number 0"}],"temperature":0}' \
    "$mock_url/chat/completions")" || die "POST $mock_url/chat/completions failed"
[[ "$reply" =~ \"content\":\"summary:[0-9a-f]{8}:bench-model:0\" ]] ||
    die "unexpected chat completion: $reply"
stop_mock "$work/mock-smoke.err"
[[ "$served" == 2 && "$answered" == 1 ]] ||
    die "the mock counted $served requests ($answered answered), expected 2 (1 answered)"
log "mock OK: $mock_url answered: $reply"

# --- 2. data and pipeline -------------------------------------------------------

log "generating $n rows in $work"
awk -v n="$n" 'BEGIN {
    for (i = 0; i < n; i++)
        printf "{\"id\": %d, \"extra_info\": {\"question\": \"question number %d: which river flows through the capital of country %d, and who founded its oldest company?\", \"answer\": \"river %d, founder %d\"}}\n", i, i, i % 97, i % 70, i % 320
}' >"$work/rows.jsonl"
printf '%s\n' 'Summarize: {extra_info.question}' >"$work/template.txt"
cat >"$work/bench.yaml" <<EOF
name: bench-llm
stages:
  summarize:
    kind: llm_map
    deps: {rows: rows.jsonl, template: template.txt}
    params: {base_url: "\${env.MOCK_URL}", model: bench-model, max_concurrent: $max_concurrent, api_key_env: MOCK_KEY}
    outs: {rows: summarized.jsonl}
EOF
[[ "$(lines "$work/rows.jsonl")" == "$n" ]] || die "generated $(lines "$work/rows.jsonl") rows, not $n"

if ((mock_only)); then
    log "--mock-only: the mock server works; not running anneal. Pipeline: $work/bench.yaml"
    exit 0
fi

# --- 3. timed runs --------------------------------------------------------------

times=()
rsss=()
run_rows=()
for ((i = 1; i <= runs; i++)); do
    start_mock "$work/mock-$i.err"
    rm -rf "$work/.anneal" "$work/summarized.jsonl"
    log "run $i/$runs: anneal run -q bench.yaml --force summarize ($n rows, mock at $mock_url)"
    export MOCK_URL="$mock_url"
    t="$(cd "$work" && timed "$work/run-$i.log" "$work/run-$i.time" \
        "$anneal" run -q bench.yaml --force summarize)"
    stop_mock "$work/mock-$i.err"
    rss="$(tail -n1 "$work/run-$i.time")"
    [[ -f "$work/summarized.jsonl" ]] || die "run $i: 'anneal run' succeeded but wrote no summarized.jsonl"
    out_rows="$(lines "$work/summarized.jsonl")"
    [[ "$served" == "$n" ]] || die "run $i: the mock served $served requests, expected exactly $n"
    [[ "$answered" == "$n" ]] || die "run $i: the mock answered $answered requests with 200, expected $n"
    [[ "$out_rows" == "$n" ]] || die "run $i: summarized.jsonl has $out_rows rows, expected $n"
    grep -q 'summary:' "$work/summarized.jsonl" || die "run $i: no mock reply ('summary:...') in summarized.jsonl"
    rate="$(awk -v n="$n" -v t="$t" 'BEGIN { printf "%.0f", n / t }')"
    log "run $i/$runs: ${t} s, $rate req/s, $served requests, peak RSS $(rss_mb "$rss") MB"
    times+=("$t")
    rsss+=("$rss")
    run_rows+=("| $i | $t s | $rate | $served | $(rss_mb "$rss") |")
done

# --- report -------------------------------------------------------------------

t_med="$(median "${times[@]}")"
rss_max="$(printf '%s\n' "${rsss[@]}" | sort -g | tail -n1)"
achieved="$(awk -v n="$n" -v t="$t_med" 'BEGIN { printf "%.0f", n / t }')"
if ((latency > 0)); then
    ideal="$(awk -v c="$max_concurrent" -v l="$latency" 'BEGIN { printf "%.0f", c * 1000 / l }')"
    ratio="$(awk -v a="$n" -v t="$t_med" -v c="$max_concurrent" -v l="$latency" \
        'BEGIN { printf "%.1f%%", 100 * (a / t) / (c * 1000 / l) }')"
    floor="$(awk -v n="$n" -v c="$max_concurrent" -v l="$latency" \
        'BEGIN { printf "%.2f", n / (c * 1000 / l) }')"
else
    ideal="n/a (LATENCY_MS=0)"
    ratio="n/a"
    floor="n/a"
fi
git_rev="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git -C "$repo" status --porcelain 2>/dev/null | head -n1)" ]]; then
    git_rev+=" (dirty)"
fi
report="$(
    echo "# anneal llm_map against a mock OpenAI server"
    echo
    echo "$n rows, one chat completion each, to the mock server"
    echo "(\`examples/mock_openai.rs\`, ${latency} ms per request, on the same machine),"
    echo "\`max_concurrent: $max_concurrent\`. Each run is \`anneal run -q bench.yaml --force summarize\`"
    echo "from a clean state (\`.anneal\` and the output removed) against a fresh mock; wall"
    echo "time includes start-up, hashing the inputs and committing the output. The mock"
    echo "served exactly $n requests in every run, all answered 200, and the output had"
    echo "$n rows. Ideal = max_concurrent * 1000 / latency_ms requests/s (no client"
    echo "overhead at all), i.e. at least $floor s for $n rows."
    echo
    echo "| median wall time | achieved req/s | ideal req/s | achieved / ideal | peak RSS MB (max of runs) |"
    echo "|---:|---:|---:|---:|---:|"
    echo "| $(printf '%.2f' "$t_med") s | $achieved | $ideal | $ratio | $(rss_mb "$rss_max") |"
    echo
    echo "| run | wall time | req/s | mock requests | peak RSS MB |"
    echo "|---:|---:|---:|---:|---:|"
    printf '%s\n' "${run_rows[@]}"
    echo
    echo "Machine:"
    echo
    echo "- cores (nproc): $(nproc)"
    echo "- CPU: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
    echo "- memory: $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "- kernel: $(uname -sr)"
    echo "- anneal: $(first_line "$anneal" --version) ($anneal, repo commit $git_rev)"
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
)"
echo
printf '%s\n' "$report"
mkdir -p "$results"
printf '%s\n' "$report" >"$results/llm_map.md"
log "wrote $results/llm_map.md"
