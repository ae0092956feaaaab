#!/usr/bin/env bash
# Measure anneal's data stages (the `agent_samples` kind) over a generated file
# of search-agent traces.
#
#   1. Generate the traces once (bench/gen_traces.py) into the work dir, or
#      reuse the file there if it was made with the same size, seed and
#      generator.
#   2. For each mode (per_step, multiturn): write a job JSON and run the stage
#      process directly, `anneal exec-stage job.json`, N times under
#      /usr/bin/time (peak RSS), deleting the output and scratch between runs.
#      Report the median wall time, input MB/s and MiB/s, median peak RSS and
#      the output size.
#   3. Time one end-to-end `anneal run` of a pipeline with both stages (this
#      includes hashing the input and committing the outputs).
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
    cat <<EOF
Usage: bench/data_stages.sh [--size SIZE] [--runs N] [--keep] [-h|--help]

Times the agent_samples stage (modes per_step and multiturn) with
'anneal exec-stage' over a generated trace file, then one end-to-end
'anneal run' of a pipeline doing both.

Options:
  --size SIZE   size of the generated trace file, K/M/G = KiB/MiB/GiB
                (default: 1G)
  --runs N      timed runs per mode (default: 3)
  --keep        keep the stage outputs, job files and pipeline dir in the work
                dir (the trace file itself is always kept, for reuse)
  --no-reference  skip the Python reference (bench/reference_agent_samples.py,
                whole file in memory like the original scripts; its output is
                compared byte for byte with anneal's; needs 'pip install blake3')
  -h, --help    show this help

Environment:
  ANNEAL        anneal binary (default: <repo>/target/release/anneal; build it
                with 'cargo build --release -p anneal')
  BENCH_WORK    work dir (default: /tmp/anneal-bench-data)
  KIND_VERSION  kind_version written into the job files (default: 1)
  SEED          generator seed (default: 0)

Writes the report to bench/results/data_stages.md.
EOF
}


# --- options ------------------------------------------------------------------

size="1G"
runs=3
keep=0
reference=1
while (($#)); do
    case "$1" in
        --size) [[ $# -ge 2 ]] || die "--size needs a value"; size="$2"; shift 2 ;;
        --size=*) size="${1#*=}"; shift ;;
        --runs) [[ $# -ge 2 ]] || die "--runs needs a value"; runs="$2"; shift 2 ;;
        --runs=*) runs="${1#*=}"; shift ;;
        --keep) keep=1; shift ;;
        --no-reference) reference=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ "$size" =~ ^[0-9]+(\.[0-9]+)?[KMGkmg]?$ ]] || die "--size must look like 500M, 1G or 20000, got '$size'"
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer, got '$runs'"
kind_version="${KIND_VERSION:-1}"
[[ "$kind_version" =~ ^[0-9]+$ ]] || die "KIND_VERSION must be a non-negative integer, got '$kind_version'"
seed="${SEED:-0}"
[[ "$seed" =~ ^[0-9]+$ ]] || die "SEED must be a non-negative integer, got '$seed'"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
results="$repo/bench/results"
gen="$repo/bench/gen_traces.py"
reference_py="$repo/bench/reference_agent_samples.py"
work="${BENCH_WORK:-/tmp/anneal-bench-data}"

# --- dependencies -------------------------------------------------------------

command -v python3 >/dev/null || die "python3 is required"
[[ -x /usr/bin/time ]] || die "/usr/bin/time is required (GNU time: apt-get install time)"
[[ -f "$gen" ]] || die "generator not found: $gen"

if [[ -z "${ANNEAL:-}" ]]; then
    anneal="$repo/target/release/anneal"
    if [[ ! -x "$anneal" ]]; then
        echo "data_stages.sh: anneal binary not found: $anneal" >&2
        echo "Build it first:  (cd $repo && cargo build --release -p anneal)" >&2
        echo "or point ANNEAL at a binary." >&2
        exit 1
    fi
else
    anneal="$ANNEAL"
fi
[[ -x "$anneal" ]] || die "anneal binary not found or not executable: $anneal"
anneal="$(cd "$(dirname "$anneal")" && pwd)/$(basename "$anneal")"

mkdir -p "$work"
work="$(cd "$work" && pwd)"
traces="$work/traces.jsonl"
meta="$work/traces.meta"
exec_dir="$work/exec"
e2e_dir="$work/e2e"

cleanup() {
    if ((keep == 0)); then
        rm -rf "$exec_dir" "$e2e_dir"
    fi
}
trap cleanup EXIT

# --- helpers ------------------------------------------------------------------

# seconds between two nanosecond timestamps
file_size() { stat -c %s "$1"; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }
# throughput of $1 bytes in $2 seconds, in units of $3 bytes
rate() { awk -v b="$1" -v t="$2" -v u="$3" 'BEGIN { if (t > 0) printf "%.1f", b / u / t; else print "n/a" }'; }

# write_job FILE MODE OUT SCRATCH: the job JSON for 'anneal exec-stage'
write_job() {
    python3 - "$1" "$2" "$kind_version" "$traces" "$3" "$4" "$exec_dir" <<'EOF'
import json, sys
path, mode, kv, traces, out, scratch, workdir = sys.argv[1:]
params = {"mode": mode}
if mode == "multiturn":
    params["seed"] = 42
job = {"stage": mode, "kind": "agent_samples", "kind_version": int(kv), "config": {},
       "params": params, "deps": {"traces": traces}, "outs": {"samples": out},
       "scratch": scratch, "workdir": workdir}
with open(path, "w") as f:
    json.dump(job, f, indent=1)
    f.write("\n")
EOF
}


# --- 1. trace file ------------------------------------------------------------

gen_id="size=$size seed=$seed gen=$(sha256sum "$gen" | cut -c1-16)"
if [[ -f "$traces" && -f "$meta" && "$(cat "$meta")" == "$gen_id" ]]; then
    log "reusing $traces ($gen_id)"
else
    log "generating $traces ($gen_id)"
    rm -f "$traces" "$meta"
    python3 "$gen" --size "$size" --seed "$seed" --out "$traces.tmp"
    mv "$traces.tmp" "$traces"
    printf '%s\n' "$gen_id" >"$meta"
fi
in_bytes="$(file_size "$traces")"
in_traces="$(lines "$traces")"
avail_kb="$(df -Pk "$work" | awk 'NR == 2 { print $4 }')"
if ((avail_kb * 1024 < 6 * in_bytes)); then
    log "warning: only $((avail_kb / 1024)) MiB free in $work; the outputs may be several times the input"
fi
# the input is read from the page cache in every run, as after generating it
cat "$traces" >/dev/null

# --- 2. exec-stage per mode -----------------------------------------------------

rows=()
mkdir -p "$exec_dir"
for mode in per_step multiturn; do
    job="$exec_dir/job-$mode.json"
    out="$exec_dir/out/$mode.jsonl"
    scratch="$exec_dir/scratch-$mode"
    write_job "$job" "$mode" "$out" "$scratch"
    times=()
    rsss=()
    for ((i = 1; i <= runs; i++)); do
        rm -rf "$out" "$scratch"
        mkdir -p "$(dirname "$out")" "$scratch"
        t="$(timed "$exec_dir/$mode.log" "$exec_dir/$mode.time" "$anneal" exec-stage "$job")"
        [[ -f "$out" ]] || die "$mode: 'anneal exec-stage' succeeded but wrote no $out"
        rss="$(tail -n1 "$exec_dir/$mode.time")"
        log "$mode run $i/$runs: ${t} s, peak RSS $(rss_mb "$rss") MB"
        times+=("$t")
        rsss+=("$rss")
    done
    t_med="$(median "${times[@]}")"
    rss_med="$(median "${rsss[@]}")"
    out_bytes="$(file_size "$out")"
    rows+=("| $mode | $(mb "$in_bytes") | $(printf '%.2f' "$t_med") s | $(rate "$in_bytes" "$t_med" 1000000) | $(rate "$in_bytes" "$t_med" 1048576) | $(rss_mb "$rss_med") | $(mb "$out_bytes") ($(lines "$out") samples) |")
    if ((reference == 1)); then
        # The same work in Python, whole file in memory as the original scripts do;
        # its output must be byte-identical to anneal's.
        ref_out="$exec_dir/out/$mode.reference.jsonl"
        t_ref="$(timed "$exec_dir/$mode.ref.log" "$exec_dir/$mode.ref.time" python3 "$reference_py" --mode "$mode" --seed 42 --think-drop-prob 0.3 --in "$traces" --out "$ref_out")"
        rss_ref="$(tail -n1 "$exec_dir/$mode.ref.time")"
        cmp -s "$out" "$ref_out" || die "$mode: anneal's output differs from the Python reference's ($out vs $ref_out)"
        log "$mode Python reference: ${t_ref} s, peak RSS $(rss_mb "$rss_ref") MB, identical output"
        speedup="$(awk -v a="$t_ref" -v b="$t_med" 'BEGIN { printf "%.1f", a / b }')"
        rows+=("| $mode, Python reference (whole file, 1 run; anneal is ${speedup}x faster) | $(mb "$in_bytes") | $(printf '%.2f' "$t_ref") s | $(rate "$in_bytes" "$t_ref" 1000000) | $(rate "$in_bytes" "$t_ref" 1048576) | $(rss_mb "$rss_ref") | identical bytes |")
        rm -f "$ref_out"
    fi
    if ((keep == 0)); then
        rm -rf "$out" "$scratch"
    fi
done

# --- 3. end-to-end anneal run -------------------------------------------------

mkdir -p "$e2e_dir"
cat >"$e2e_dir/bench.yaml" <<'EOF'
name: bench-data
stages:
  per_step:
    kind: agent_samples
    deps: {traces: traces.jsonl}
    params: {mode: per_step}
    outs: {samples: per_step.jsonl}
  multiturn:
    kind: agent_samples
    deps: {traces: traces.jsonl}
    params: {mode: multiturn, seed: 42, think_drop_prob: 0.3}
    outs: {samples: multiturn.jsonl}
EOF
rm -f "$e2e_dir/traces.jsonl"
ln "$traces" "$e2e_dir/traces.jsonl" 2>/dev/null || cp "$traces" "$e2e_dir/traces.jsonl"
rm -rf "$e2e_dir/.anneal" "$e2e_dir/per_step.jsonl" "$e2e_dir/multiturn.jsonl"
log "end-to-end: anneal run -q bench.yaml --jobs 1"
t_e2e="$(cd "$e2e_dir" && timed "$e2e_dir/run.log" "$e2e_dir/run.time" "$anneal" run -q bench.yaml --jobs 1)"
rss_e2e="$(tail -n1 "$e2e_dir/run.time")"
e2e_out=0
e2e_missing=()
for o in per_step multiturn; do
    if [[ -f "$e2e_dir/$o.jsonl" ]]; then
        e2e_out=$((e2e_out + $(file_size "$e2e_dir/$o.jsonl")))
    else
        e2e_missing+=("$o.jsonl")
    fi
done
if ((${#e2e_missing[@]})); then
    log "warning: 'anneal run' left no ${e2e_missing[*]} in $e2e_dir"
    e2e_cell="$(mb "$e2e_out") (missing: ${e2e_missing[*]})"
else
    e2e_cell="$(mb "$e2e_out") (both)"
fi
rows+=("| anneal run, both stages (1 run) | $(mb "$in_bytes") | $(printf '%.2f' "$t_e2e") s | $(rate "$in_bytes" "$t_e2e" 1000000) | $(rate "$in_bytes" "$t_e2e" 1048576) | $(rss_mb "$rss_e2e") | $e2e_cell |")

# --- report -------------------------------------------------------------------

git_rev="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git -C "$repo" status --porcelain 2>/dev/null | head -n1)" ]]; then
    git_rev+=" (dirty)"
fi
report="$(
    echo "# anneal data stages: agent_samples"
    echo
    echo "Input: $traces, $in_bytes bytes ($(mb "$in_bytes"), $in_traces traces;"
    echo "\`gen_traces.py --size $size --seed $seed\`), read from the page cache."
    echo "Stage rows: median of $runs runs of \`anneal exec-stage job.json\`; the last"
    echo "row is one \`anneal run -q bench.yaml --jobs 1\` from a clean state (hashing"
    echo "the input, both stages one after the other, committing the outputs)."
    echo "MB/s and MiB/s are input bytes / wall time (1 MB = 1e6 bytes); peak RSS is"
    echo "the largest process (GNU time %M)."
    echo
    echo "| mode | input | median time | MB/s | MiB/s | peak RSS MB | output size |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${rows[@]}"
    echo
    echo "Machine:"
    echo
    echo "- cores (nproc): $(nproc)"
    echo "- CPU: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
    echo "- memory: $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "- kernel: $(uname -sr)"
    echo "- anneal: $(first_line "$anneal" --version) ($anneal, repo commit $git_rev)"
    echo "- kind_version: $kind_version"
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
)"
echo
printf '%s\n' "$report"
mkdir -p "$results"
printf '%s\n' "$report" >"$results/data_stages.md"
log "wrote $results/data_stages.md"
if ((keep)); then
    log "kept the outputs and job files in $work"
fi
