#!/usr/bin/env bash
# Sweeps and summaries for biomedap.py and biomedvr.py.
#
#   bash run.sh smoke                                   try it: CPU, offline, tiny backbones, < 2 min
#   bash run.sh fewshot    METHOD [DATASETS] [SHOTS] [SEEDS] [--dry-run] [-- FLAGS...]
#   bash run.sh base2novel METHOD [DATASETS] [SEEDS]         [--dry-run] [-- FLAGS...]
#   bash run.sh robustness METHOD [DATASETS] [SHOTS] [SEEDS] [--dry-run] [-- FLAGS...]
#   bash run.sh tables     METHOD                            [--dry-run] [-- FLAGS...]
#   bash run.sh zeroshot   [DATASETS]                        [--dry-run] [-- FLAGS...]
#   bash run.sh summarize  [RUNS_DIR]
#
# METHOD is biomedap or biomedvr. SHOTS and SEEDS are quoted lists ("1 2 4" or 1,2,4) or "all"
# for the defaults: shots 1 2 4 8 16 (16 for base2novel), seeds 1 2 3. DATASETS is "all" (the 11
# benchmarks), one benchmark name or folder path (a path that is a folder is taken whole, spaces
# and all), or a list: separated by commas or newlines when it has any ("btmri,/data/my scans"),
# else by spaces ("btmri busi"). A bare benchmark name is the benchmark; ./btmri is a folder. FLAGS after "--" go to every job (e.g. -- --variant official
# --root /data) and mean the same to the sweep: --out (or --out=) is where it looks for finished
# runs and writes the summary, --backbone, --variant and --cs-anchor pick the run folders.
# `tables` is exactly the runs of the published tables: BiomedAP's few-shot table (K=1..16)
# and base-to-novel table, BioMedVR's 16-shot table.
# Finished runs (metrics.json present) are skipped and unfinished ones resumed, so an
# interrupted sweep continues where it stopped. GPUS="0 1 2 3" runs one job per GPU at a
# time; --dry-run prints the jobs, one command a line (for GNU parallel or a SLURM array).
# Environment: PYTHON (python), OUT (runs; --out after "--" wins), GPUS (empty: one job at a time
# on the default device). A relative dataset path is taken from the folder you run this from, a
# relative output path from this script's folder.
set -euo pipefail
CALLER=$PWD  # relative dataset paths are the caller's
cd "$(dirname "$0")"

PYTHON=${PYTHON:-$(command -v python >/dev/null && echo python || echo python3)}
OUT=${OUT:-runs}
ALL_DATASETS="btmri busi chmnist covid ctkidney dermamnist kneexray kvasir lungcolon octmnist retina"
ALL_SHOTS="1 2 4 8 16"
ALL_SEEDS="1 2 3"

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
pick() { if [[ -z "${1:-}" || "$1" == "all" ]]; then echo "$2"; else echo "${1//,/ }"; fi; }
from_caller() {  # DATASET as the jobs, run from this script's folder, must name it: a bare benchmark name
  if is_benchmark "$1" || [[ $1 == /* || ! -d $CALLER/$1 ]]; then echo "$1"  # as it is, a folder
  else (cd "$CALLER" && cd "$1" && pwd); fi                                  # from the caller's folder
}
pick_datasets() {  # DATASETS -> the array DS (see the header for the rules)
  local arg=${1:-all} item i
  DS=()
  if [[ $arg == all ]]; then read -ra DS <<<"$ALL_DATASETS"
  elif [[ -d $(from_caller "$arg") ]] && ! is_benchmark "$arg"; then DS=("$arg")
  elif [[ $arg == *[,$'\n']* ]]; then
    while IFS= read -r item; do
      item=${item#"${item%%[![:space:]]*}"}; item=${item%"${item##*[![:space:]]}"}  # spaces around an item
      [[ -n $item ]] && DS+=("$item")
    done <<<"${arg//,/$'\n'}"
  else read -ra DS <<<"$arg"; fi
  ((${#DS[@]})) || { echo "error: no dataset in '$arg'" >&2; exit 2; }
  for i in "${!DS[@]}"; do DS[i]=$(from_caller "${DS[i]}"); done
}

# ---- split the command line: positional lists, --dry-run, and FLAGS after "--"
DRY=0; POS=(); EXTRA=()
while (($#)); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage 0 ;;
    *) POS+=("$1") ;;
  esac
  shift
done
CMD=${POS[0]:-}

flag_value() {  # FLAG DEFAULT: the last value FLAG gets in the FLAGS after "--" (as argparse reads them)
  local value=$2 prev="" a
  for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do
    [[ "$prev" == "$1" ]] && value=$a
    [[ "$a" == "$1="* ]] && value=${a#*=}
    prev=$a
  done
  echo "$value"
}

backbone_dir() {  # "" for BiomedCLIP, else the backbone's folder (runner.backbone_folder's rule) and /
  local b; b=$(flag_value --backbone biomedclip)
  [[ $b == biomedclip || $b == hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 ]] || echo "${b//[^A-Za-z0-9._-]/_}/"
}

method_dir() {  # where a method's runs go: [<backbone>/]biomedap[-official] or [<backbone>/]biomedvr[-fused]
  local m=$1
  [[ $m == biomedap && $(flag_value --variant paper) == official ]] && m=biomedap-official
  [[ $m == biomedvr && $(flag_value --cs-anchor positive) == fused ]] && m=biomedvr-fused
  echo "$(backbone_dir)$m"
}

OUT=$(flag_value --out "$OUT")  # the jobs' own --out: where the sweep looks for their runs
OUT_FLAG=(--out "$OUT")          # given to each job, unless the FLAGS after "--" already say it
[[ " ${EXTRA[*]-} " == *" --out "* || " ${EXTRA[*]-} " == *" --out="* ]] && OUT_FLAG=()
JOBS=(); DATASETS_USED=(); METHOD_USED=zeroshot; DS=()

is_benchmark() { local b; for b in $ALL_DATASETS synthetic; do [[ ${1,,} == "$b" ]] && return 0; done; return 1; }
dataset_key() {  # the dataset's folder name in runs/, as data.dataset_key: a benchmark in lower case,
  local name  # your own folder by its own name, and with _folder after a benchmark's name
  if is_benchmark "$1" || [[ ! -d $1 ]]; then echo "${1,,}"; return; fi
  name=$(basename "$(cd "$1" && pwd -P)")
  if is_benchmark "$name"; then echo "${name}_folder"; else echo "$name"; fi
}
use_dataset() {  # DATASET: remember it for the setup check, once
  local u
  for u in "${DATASETS_USED[@]+"${DATASETS_USED[@]}"}"; do [[ $u == "$1" ]] && return; done
  DATASETS_USED+=("$1")
}
quoted() { local out; printf -v out '%q ' "$@"; echo "${out% }"; }  # one shell-safe line
add_job() {  # METHOD DATASET SHOTS SEED PROTOCOL(fewshot|base2novel|robustness)
  local m=$1 d=$2 k=$3 s=$4 p=$5 sub="" flags=()
  [[ $p == base2novel ]] && { sub="_base2novel"; flags+=(--subsample base); }
  [[ $p == robustness ]] && flags+=(--robustness)
  local dir="$OUT/$(method_dir "$m")/$(dataset_key "$d")/${k}shot$sub/seed$s"
  use_dataset "$d"
  if [[ -f $dir/metrics.json ]]; then
    # a robustness job needs the robustness block; a plain finished run is re-evaluated for it
    if [[ $p != robustness ]] || grep -q '"robustness"' "$dir/metrics.json"; then return; fi
    JOBS+=("$(quoted "$PYTHON" "$m.py" --eval-only "$dir" --robustness "${EXTRA[@]+"${EXTRA[@]}"}")")
    return
  fi
  [[ -f $dir/checkpoint.pt ]] && flags+=(--resume)
  JOBS+=("$(quoted "$PYTHON" "$m.py" --dataset "$d" --shots "$k" --seed "$s" "${OUT_FLAG[@]+"${OUT_FLAG[@]}"}" "${flags[@]+"${flags[@]}"}" "${EXTRA[@]+"${EXTRA[@]}"}")")
}

sweep() {  # METHOD PROTOCOL SHOTS SEEDS, over the datasets in DS
  local m=$1 p=$2 d k s
  [[ $m == biomedap || $m == biomedvr ]] || { echo "error: METHOD must be biomedap or biomedvr, not '$m'" >&2; exit 2; }
  [[ $p == robustness && $m != biomedap ]] && { echo "error: robustness is a BiomedAP evaluation" >&2; exit 2; }
  METHOD_USED=$m
  for d in "${DS[@]}"; do for k in $3; do for s in $4; do add_job "$m" "$d" "$k" "$s" "$p"; done; done; done
}

preflight() {  # once, before any job: the flags parse, the backbone loads, every dataset is there
  if ! $PYTHON "$METHOD_USED.py" --check-setup "${DATASETS_USED[@]}" "${EXTRA[@]+"${EXTRA[@]}"}"; then
    echo "the sweep did not start: fix the setup error above, then run it again" >&2; exit 2
  fi
}

run_jobs() {  # run the job list (sequentially, or one worker per GPU), then the summary
  if ((DRY)); then printf '%s\n' "${JOBS[@]+"${JOBS[@]}"}"; return; fi
  local n=${#JOBS[@]} failures

  ((n)) && preflight
  failures=$(mktemp)
  echo "$n jobs to run" >&2
  local gpus=(${GPUS:-""}) i
  for ((i=0; i<${#gpus[@]}; i++)); do   # worker i takes every len(GPUS)-th job
    ( for ((j=i; j<n; j+=${#gpus[@]})); do
        echo "+ ${gpus[i]:+[gpu ${gpus[i]}] }${JOBS[j]}" >&2
        if [[ -n "${gpus[i]}" ]]; then export CUDA_VISIBLE_DEVICES=${gpus[i]}; fi
        eval "${JOBS[j]}" || echo "${JOBS[j]}" >>"$failures"
      done ) &
  done
  wait
  $PYTHON report.py "$OUT"
  if [[ -s $failures ]]; then
    echo "$(wc -l <"$failures") job(s) failed:" >&2; cat "$failures" >&2; rm -f "$failures"; exit 1
  fi
  rm -f "$failures"
}

case "$CMD" in
  smoke)
    OUT=${OUT_SMOKE:-runs/smoke}
    for bb in tiny tiny-clip; do
      for m in biomedap biomedvr; do
        JOBS+=("$(quoted "$PYTHON" "$m.py" --dataset synthetic --backbone "$bb" --shots 8 --seed 1 --epochs 5 --device cpu --workers 0 --out "$OUT" --overwrite)")
      done
      JOBS+=("$(quoted "$PYTHON" zeroshot.py --dataset synthetic --backbone "$bb" --device cpu --workers 0 --out "$OUT" --overwrite)")
    done
    run_jobs_smoke() {  # runs land in $OUT/tiny/... and $OUT/tiny-clip/...: one table per backbone
      for job in "${JOBS[@]}"; do echo "+ $job" >&2; eval "$job" | tail -n 3; done
      $PYTHON report.py "$OUT"
      echo "(small random backbones and 5 epochs: accuracies near chance, 25%, are expected; this checks" \
           "that every step runs. Real numbers need BiomedCLIP and a dataset, see README.)"
    }
    if ((DRY)); then printf '%s\n' "${JOBS[@]}"; else run_jobs_smoke; fi ;;
  fewshot|robustness)
    pick_datasets "${POS[2]:-}"
    sweep "${POS[1]:-}" "$CMD" "$(pick "${POS[3]:-}" "$([[ $CMD == robustness ]] && echo 16 || echo "$ALL_SHOTS")")" \
      "$(pick "${POS[4]:-}" "$ALL_SEEDS")"
    run_jobs ;;
  base2novel)
    pick_datasets "${POS[2]:-}"
    sweep "${POS[1]:-}" base2novel 16 "$(pick "${POS[3]:-}" "$ALL_SEEDS")"
    run_jobs ;;
  tables)
    case "${POS[1]:-}" in
      biomedap) pick_datasets all
                sweep biomedap fewshot "$ALL_SHOTS" "$ALL_SEEDS"
                sweep biomedap base2novel 16 "$ALL_SEEDS" ;;
      biomedvr) EXTRA=(--cs-anchor fused "${EXTRA[@]+"${EXTRA[@]}"}")  # the released Table-1 loss
                pick_datasets all
                sweep biomedvr fewshot 16 "$ALL_SEEDS" ;;
      *) echo "error: tables needs METHOD: biomedap or biomedvr" >&2; exit 2 ;;
    esac
    run_jobs ;;
  zeroshot)  # the frozen backbone's zero-shot accuracy, the K=0 column of the summary
    pick_datasets "${POS[1]:-}"
    for d in "${DS[@]}"; do
      use_dataset "$d"
      [[ -f $OUT/$(backbone_dir)zeroshot/$(dataset_key "$d")/seed1/metrics.json ]] && continue
      JOBS+=("$(quoted "$PYTHON" zeroshot.py --dataset "$d" "${OUT_FLAG[@]+"${OUT_FLAG[@]}"}" "${EXTRA[@]+"${EXTRA[@]}"}")")
    done
    run_jobs ;;
  summarize) $PYTHON report.py "${POS[1]:-$OUT}" ;;
  "") usage ;;
  *) echo "error: unknown command '$CMD': use smoke, fewshot, base2novel, robustness, tables, zeroshot or summarize" >&2
     exit 2 ;;
esac
