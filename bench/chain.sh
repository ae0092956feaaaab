#!/usr/bin/env bash
# Benchmark a linear chain of trivial shell stages in anneal, DVC and Snakemake.
#
# Stage s0 copies input.txt ("seed") to s0.txt and appends "0"; stage si copies
# s(i-1).txt to si.txt and appends "i". Every tool does exactly this work.
#
# Three operations are timed with hyperfine, each in its own fresh work dir:
#   full  full run from a clean state (outputs, lock files and caches removed)
#   noop  rerun with everything up to date
#   plan  plan / dry run with everything up to date
#         (anneal plan, dvc status, snakemake -n)
set -euo pipefail

usage() {
    cat <<EOF
Usage: bench/chain.sh [--tools LIST] [--stages N] [-h|--help]

Times a chain of N trivial 'cp IN OUT && echo i >> OUT' stages in anneal, DVC
and Snakemake: full run from a clean state, no-op rerun, and plan/dry run.

Options:
  --tools LIST   comma-separated subset of anneal,dvc,snakemake
                 (default: anneal,dvc,snakemake)
  --stages N     number of stages in the chain (default: 50)
  -h, --help     show this help

Environment:
  RUNS         hyperfine runs per measurement (default: 10, full runs: 5)
  ANNEAL       anneal binary (default: <repo>/target/release/anneal; built
               with 'cargo build --release -p anneal' if missing)
  BENCH_VENV   venv holding DVC and Snakemake, created and filled with
               'pip install dvc snakemake' if missing
               (default: \$HOME/.cache/anneal-bench-venv)
  KEEP_WORK=1  keep the temporary work directories

Writes hyperfine JSON exports and chain.md to bench/results/.
EOF
}

die() { echo "chain.sh: $*" >&2; exit 1; }
log() { echo "==> $*" >&2; }

# --- options ------------------------------------------------------------------

tools_csv="anneal,dvc,snakemake"
stages=50
while (($#)); do
    case "$1" in
        --tools) [[ $# -ge 2 ]] || die "--tools needs a value"; tools_csv="$2"; shift 2 ;;
        --tools=*) tools_csv="${1#*=}"; shift ;;
        --stages) [[ $# -ge 2 ]] || die "--stages needs a value"; stages="$2"; shift 2 ;;
        --stages=*) stages="${1#*=}"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ "$stages" =~ ^[1-9][0-9]*$ ]] || die "--stages must be a positive integer, got '$stages'"

declare -A want=()
IFS=, read -r -a tool_list <<<"$tools_csv"
for t in "${tool_list[@]}"; do
    case "$t" in
        anneal | dvc | snakemake) want[$t]=1 ;;
        *) die "unknown tool '$t' (expected anneal, dvc or snakemake)" ;;
    esac
done
((${#want[@]})) || die "--tools selects no tool"
has() { [[ -n "${want[$1]:-}" ]]; }

runs_cheap="${RUNS:-10}"
runs_full="${RUNS:-5}"
[[ "$runs_cheap" =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, got '$runs_cheap'"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
results="$repo/bench/results"
venv="${BENCH_VENV:-$HOME/.cache/anneal-bench-venv}"
last=$((stages - 1))
export DVC_NO_ANALYTICS=1

# --- dependencies -------------------------------------------------------------

as_root() { if ((EUID == 0)); then "$@"; else sudo "$@"; fi; }

if ! command -v hyperfine >/dev/null; then
    log "installing hyperfine via apt"
    as_root apt-get update
    as_root apt-get install -y hyperfine
fi
command -v python3 >/dev/null || die "python3 is required"

if has dvc || has snakemake; then
    if [[ ! -x "$venv/bin/dvc" || ! -x "$venv/bin/snakemake" ]]; then
        if [[ ! -x "$venv/bin/python" ]]; then
            log "creating venv $venv"
            mkdir -p "$(dirname "$venv")"
            python3 -m venv "$venv"
        fi
        log "installing dvc and snakemake into $venv"
        "$venv/bin/pip" install --quiet --upgrade pip
        "$venv/bin/pip" install --quiet dvc snakemake
    fi
    dvc="$venv/bin/dvc"
    snakemake="$venv/bin/snakemake"
    dvc_sh="$(printf %q "$dvc")" # for hyperfine's shell
    snakemake_sh="$(printf %q "$snakemake")"
fi

if has anneal; then
    if [[ -z "${ANNEAL:-}" ]]; then
        anneal="$repo/target/release/anneal"
        if [[ ! -x "$anneal" ]]; then
            log "building anneal (cargo build --release -p anneal)"
            (cd "$repo" && cargo build --release -p anneal)
        fi
    else
        anneal="$ANNEAL"
    fi
    [[ -x "$anneal" ]] || die "anneal binary not found or not executable: $anneal"
    anneal="$(cd "$(dirname "$anneal")" && pwd)/$(basename "$anneal")"
    anneal_sh="$(printf %q "$anneal")" # for hyperfine's shell
    # Use -q when 'anneal run' has it; hyperfine discards output anyway.
    anneal_q=""
    if "$anneal" run --help 2>&1 | grep -qE -- '(^|[[:space:],])(-q|--quiet)([[:space:],]|$)'; then
        anneal_q="-q"
    fi
fi

# --- machine info -------------------------------------------------------------

first_line() { "$@" 2>&1 | head -n1; }
info=(
    "- cores (nproc): $(nproc)"
    "- CPU: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
    "- kernel: $(uname -sr)"
    "- hyperfine: $(first_line hyperfine --version)"
    "- stages: $stages, runs: $runs_full (full) / $runs_cheap (noop, plan), warmup: 1"
)
has anneal && info+=("- anneal: $(first_line "$anneal" --version)")
has dvc && info+=("- DVC: $(first_line "$dvc" --version) (git $(git --version | awk '{print $3}'))")
has snakemake && info+=("- Snakemake: $(first_line "$snakemake" --version)")
if has dvc || has snakemake; then
    info+=("- Python (venv): $(first_line "$venv/bin/python" --version)")
fi
printf '%s\n' "${info[@]}"
echo

# --- pipeline generators ------------------------------------------------------

write_input() { printf 'seed\n' >input.txt; }

write_anneal() {
    local i
    {
        echo "name: chain"
        echo "stages:"
        for ((i = 0; i < stages; i++)); do
            echo "  s$i:"
            echo "    kind: command"
            echo "    cmd: cp \${deps.in} \${outs.out} && echo $i >> \${outs.out}"
            echo "    deps:"
            if ((i == 0)); then
                echo "      in: input.txt"
            else
                echo "      in: \${stages.s$((i - 1)).outs.out}"
            fi
            echo "    outs:"
            echo "      out: s$i.txt"
        done
    } >chain.yaml
}

write_dvc() {
    local i in
    {
        echo "stages:"
        for ((i = 0; i < stages; i++)); do
            if ((i == 0)); then in=input.txt; else in="s$((i - 1)).txt"; fi
            echo "  s$i:"
            echo "    cmd: cp $in s$i.txt && echo $i >> s$i.txt"
            echo "    deps:"
            echo "    - $in"
            echo "    outs:"
            echo "    - s$i.txt"
        done
    } >dvc.yaml
}

write_snakefile() {
    local i in
    {
        for ((i = 0; i < stages; i++)); do
            if ((i == 0)); then in=input.txt; else in="s$((i - 1)).txt"; fi
            echo "rule s$i:"
            echo "    input: \"$in\""
            echo "    output: \"s$i.txt\""
            echo "    shell: \"cp {input} {output} && echo $i >> {output}\""
            echo
        done
    } >Snakefile
}

# --- measuring ----------------------------------------------------------------

# Fails unless s<last>.txt is "seed" followed by the lines 0..last.
check_chain() {
    local tool="$1" out="s$last.txt"
    [[ -f "$out" ]] || die "$tool: $out missing after full run"
    [[ "$(wc -l <"$out")" -eq $((stages + 1)) ]] ||
        die "$tool: $out has $(wc -l <"$out") lines, expected $((stages + 1))"
    [[ "$(tail -n1 "$out")" == "$last" ]] || die "$tool: $out does not end with '$last'"
    diff -q <(echo seed; seq 0 "$last") "$out" >/dev/null || die "$tool: $out has unexpected content"
}

# bench TOOL OP RUNS CMD [PREPARE]
bench() {
    local tool="$1" op="$2" runs="$3" cmd="$4" prepare="${5:-}"
    local args=(--warmup 1 --runs "$runs" --export-json "$results/chain-$tool-$op.json"
        --command-name "$tool $op")
    [[ -n "$prepare" ]] && args+=(--prepare "$prepare")
    log "$tool: $op"
    hyperfine "${args[@]}" "$cmd"
}

# run_tool TOOL RESET RUN PLAN: times full, noop and plan in the current dir.
run_tool() {
    local tool="$1" reset="$2" run="$3" plan="$4" before
    bench "$tool" full "$runs_full" "$run" "$reset"
    check_chain "$tool"
    before="$(stat -c %y "s0.txt" "s$last.txt")"
    bench "$tool" noop "$runs_cheap" "$run"
    check_chain "$tool"
    [[ "$(stat -c %y "s0.txt" "s$last.txt")" == "$before" ]] ||
        echo "WARNING: $tool no-op rerun rewrote outputs" >&2
    bench "$tool" plan "$runs_cheap" "$plan"
}

mkdir -p "$results"
rm -f "$results"/chain-*.json
work="$(mktemp -d "${TMPDIR:-/tmp}/anneal-bench-chain.XXXXXX")"
if [[ -n "${KEEP_WORK:-}" ]]; then
    log "work dirs kept under $work"
else
    trap 'rm -rf "$work"' EXIT
fi

if has anneal; then
    mkdir "$work/anneal" && cd "$work/anneal"
    write_input
    write_anneal
    run_tool anneal \
        "rm -rf .anneal s*.txt" \
        "$anneal_sh run $anneal_q chain.yaml" \
        "$anneal_sh plan chain.yaml"
fi

if has dvc; then
    mkdir "$work/dvc" && cd "$work/dvc"
    git init --quiet
    "$dvc" init --quiet
    "$dvc" config core.analytics false
    "$dvc" config core.check_update false
    # Keep DVC's hash/index databases inside the work dir so a reset clears them.
    "$dvc" config --local core.site_cache_dir "$PWD/.dvc/site-cache"
    write_input
    write_dvc
    # Full run: no outputs, no lock file, no object or run cache.
    run_tool dvc \
        "rm -rf s*.txt dvc.lock .dvc/cache .dvc/tmp .dvc/site-cache" \
        "$dvc_sh repro --quiet" \
        "$dvc_sh status --quiet"
fi

if has snakemake; then
    mkdir "$work/snakemake" && cd "$work/snakemake"
    write_input
    write_snakefile
    run_tool snakemake \
        "rm -rf .snakemake s*.txt" \
        "$snakemake_sh --cores 1 --quiet all -- s$last.txt" \
        "$snakemake_sh --cores 1 --dry-run --quiet all -- s$last.txt"
fi
cd "$repo"

# --- report -------------------------------------------------------------------

table="$(python3 - "$results" "$tools_csv" <<'EOF'
import json, os, sys

results, tools = sys.argv[1], sys.argv[2].split(",")

def median(tool, op):
    path = os.path.join(results, f"chain-{tool}-{op}.json")
    if tool not in tools or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["results"][0]["median"]

def ms(t):
    return "n/a" if t is None else f"{t * 1000:.1f} ms"

def ratio(t, base):
    return "n/a" if t is None or base is None else f"{t / base:.1f}x"

ops = [("full", "full run (clean)"), ("noop", "no-op rerun"), ("plan", "plan / dry run")]
print("| operation | anneal median | DVC median | Snakemake median | DVC/anneal | Snakemake/anneal |")
print("|---|---:|---:|---:|---:|---:|")
for op, label in ops:
    a, d, s = (median(t, op) for t in ("anneal", "dvc", "snakemake"))
    print(f"| {label} | {ms(a)} | {ms(d)} | {ms(s)} | {ratio(d, a)} | {ratio(s, a)} |")
EOF
)"

{
    echo "# Chain benchmark: $stages stages"
    echo
    echo "Generated by \`bench/chain.sh --tools $tools_csv --stages $stages\` on $(date -u '+%Y-%m-%d %H:%M UTC')."
    echo
    printf '%s\n' "${info[@]}"
    echo
    echo "$table"
} >"$results/chain.md"

echo
echo "$table"
echo
log "wrote $results/chain.md"
