#!/usr/bin/env bash
# Submit the conversion of several mice to SLURM: one job array (convert-array.sbatch, one
# task per shard of each mouse), then one finalize job (finalize.sbatch) that starts only
# when every array task has exited 0 (--dependency=afterok).
#
#   examples/slurm/submit.sh STORE SHARDS SOURCE...
#
#   STORE    the store folder (created if missing)
#   SHARDS   shards per mouse: each mouse is converted by SHARDS array tasks
#   SOURCE   one or more mice (.zip archives or extracted folders)
#
# Environment (all optional):
#   SENSORIUM_INGEST        the converter; default: `sensorium-ingest` found on PATH here
#   SBATCH_EXTRA            extra sbatch options for both jobs, e.g.
#                           "--partition=cpu --account=mylab --qos=normal"
#   ARRAY_SBATCH_EXTRA      extra sbatch options for the array only, e.g. "--cpus-per-task=8 --mem=8G"
#   FINALIZE_SBATCH_EXTRA   extra sbatch options for the finalize job only
#   ARRAY_LIMIT             at most this many array tasks run at once (sbatch --array=...%N)
#   LOG_DIR                 where the mouse list and the jobs' logs go;
#                           default: ./sensorium-slurm (relative to the current directory)
# Options in these variables come after the scripts' #SBATCH defaults and win over them.
#
# Output: a summary, then as the LAST line, for scripts:
#   array=<array job id> finalize=<finalize job id>
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { printf 'submit: %s\n' "$*" >&2; exit 2; }

if [ "$#" -lt 3 ]; then
    die "usage: $0 STORE SHARDS SOURCE... (see the comments at the top of $0)"
fi
STORE="$1"
SHARDS="$2"
shift 2
[[ $SHARDS =~ ^[1-9][0-9]*$ ]] || die "SHARDS must be a positive integer, got '$SHARDS'"
command -v sbatch >/dev/null 2>&1 || die "sbatch not found: run this on a SLURM login node"

# The converter's default dataset name for a source path (keep in step with finalize.sbatch).
dataset_name() {
    local path="${1%/}" base d
    local subs=()
    path="$(realpath -- "$path" 2>/dev/null || printf '%s' "$path")"   # symlinks resolved
    base="${path##*/}"
    if [ -d "$path" ]; then
        # A folder that only wraps the dataset folder is named after the dataset folder.
        if [ ! -d "$path/data" ] && [ ! -d "$path/meta" ]; then
            for d in "$path"/*/; do
                [ -d "$d" ] || continue
                d="${d%/}"; d="${d##*/}"
                case "$d" in __MACOSX|._*|.DS_Store|Thumbs.db) continue ;; esac
                subs+=("$d")
            done
            if [ "${#subs[@]}" -eq 1 ]; then base="${subs[0]}"; fi
        fi
    else
        base="${base%.zip}"
    fi
    if [[ $base =~ ^(.*)-[A-Za-z][A-Za-z0-9_]*-[0-9a-fA-F]{32}$ ]]; then base="${BASH_REMATCH[1]}"; fi
    printf '%s\n' "$base"
}

# The converter the jobs will run: an absolute path, so compute nodes use the same binary.
BIN="${SENSORIUM_INGEST:-sensorium-ingest}"
if resolved="$(command -v -- "$BIN" 2>/dev/null)" && [ -n "$resolved" ]; then
    case "$resolved" in
        /*) BIN="$resolved" ;;
        *) BIN="$(cd "$(dirname "$resolved")" && pwd)/$(basename "$resolved")" ;;
    esac
else
    printf 'submit: warning: %s not found here; the jobs will look for it on the compute nodes\n' \
        "$BIN" >&2
fi
export SENSORIUM_INGEST="$BIN"

# Sources: absolute paths (the jobs may start in another directory), unique dataset names.
sources=()
names=()
for src in "$@"; do
    [ -e "$src" ] || die "source $src not found"
    abs="$(realpath -- "$src")"
    name="$(dataset_name "$abs")"
    for other in "${names[@]}"; do
        [ "$other" != "$name" ] || die "two sources have the dataset name $name (one is $src)"
    done
    sources+=("$abs")
    names+=("$name")
done

mkdir -p "$STORE"
STORE="$(realpath -- "$STORE")"
LOG_DIR="${LOG_DIR:-sensorium-slurm}"
mkdir -p "$LOG_DIR"
LOG_DIR="$(realpath -- "$LOG_DIR")"
LIST="$LOG_DIR/mice-$(date +%Y%m%d-%H%M%S)-$$.txt"
printf '%s\n' "${sources[@]}" > "$LIST"

n="${#sources[@]}"
tasks=$((n * SHARDS))
array="0-$((tasks - 1))"
if [ -n "${ARRAY_LIMIT:-}" ]; then array="$array%$ARRAY_LIMIT"; fi

read -r -a extra <<< "${SBATCH_EXTRA:-}"
read -r -a array_extra <<< "${ARRAY_SBATCH_EXTRA:-}"
read -r -a finalize_extra <<< "${FINALIZE_SBATCH_EXTRA:-}"

job_id() { printf '%s\n' "${1%%;*}"; }    # --parsable prints "id" or "id;cluster"

array_out="$(sbatch --parsable --export=ALL --array="$array" \
    --output="$LOG_DIR/%x-%A_%a.out" \
    ${extra[@]+"${extra[@]}"} ${array_extra[@]+"${array_extra[@]}"} \
    "$HERE/convert-array.sbatch" "$LIST" "$STORE" "$SHARDS")" \
    || die "submitting the array failed"
ARRAY_ID="$(job_id "$array_out")"
[[ $ARRAY_ID =~ ^[0-9]+$ ]] || die "unexpected sbatch output: $array_out"

if ! finalize_out="$(sbatch --parsable --export=ALL --dependency="afterok:$ARRAY_ID" \
        --output="$LOG_DIR/%x-%j.out" \
        ${extra[@]+"${extra[@]}"} ${finalize_extra[@]+"${finalize_extra[@]}"} \
        "$HERE/finalize.sbatch" "$LIST" "$STORE")"; then
    printf 'submit: submitting the finalize job failed; cancelling array %s\n' "$ARRAY_ID" >&2
    scancel "$ARRAY_ID" || true
    exit 1
fi
FINALIZE_ID="$(job_id "$finalize_out")"
[[ $FINALIZE_ID =~ ^[0-9]+$ ]] || die "unexpected sbatch output: $finalize_out"

printf 'submit: %d mice x %d shards = %d array tasks (job %s), then finalize (job %s)\n' \
    "$n" "$SHARDS" "$tasks" "$ARRAY_ID" "$FINALIZE_ID"
for i in "${!sources[@]}"; do
    printf '  tasks %d-%d: %s -> %s/%s\n' "$((i * SHARDS))" "$((i * SHARDS + SHARDS - 1))" \
        "${sources[$i]}" "$STORE" "${names[$i]}"
done
printf 'submit: converter %s\n' "$BIN"
printf 'submit: mouse list %s; logs %s/\n' "$LIST" "$LOG_DIR"
printf 'submit: watch with: squeue -j %s,%s\n' "$ARRAY_ID" "$FINALIZE_ID"
printf 'array=%s finalize=%s\n' "$ARRAY_ID" "$FINALIZE_ID"
