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
# METHOD is biomedap or biomedvr. DATASETS, SHOTS and SEEDS are quoted lists ("btmri busi",
# "1 2 4") or "all" for the defaults: the 11 datasets, shots 1 2 4 8 16 (16 for base2novel),
# seeds 1 2 3. FLAGS after "--" go to every job (e.g. -- --variant official --root /data).
# `tables` is exactly the runs of the published tables: BiomedAP's few-shot table (K=1..16)
# and base-to-novel table, BioMedVR's 16-shot table.
# Finished runs (metrics.json present) are skipped and unfinished ones resumed, so an
# interrupted sweep continues where it stopped. GPUS="0 1 2 3" runs one job per GPU at a
# time; --dry-run prints the jobs, one command a line (for GNU parallel or a SLURM array).
# Environment: PYTHON (python), OUT (runs), GPUS (empty: one job at a time on the default device).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-$(command -v python >/dev/null && echo python || echo python3)}
OUT=${OUT:-runs}
ALL_DATASETS="btmri busi chmnist covid ctkidney dermamnist kneexray kvasir lungcolon octmnist retina"
ALL_SHOTS="1 2 4 8 16"
ALL_SEEDS="1 2 3"

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
pick() { if [[ -z "${1:-}" || "$1" == "all" ]]; then echo "$2"; else echo "${1//,/ }"; fi; }

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

JOBS=(); DATASETS_USED=(); METHOD_USED=zeroshot

dataset_key() {  # the dataset's folder name in runs/, as data.dataset_key: a benchmark in lower case,
  local lower=${1,,}  # your own folder by its own name
  if [[ " $ALL_DATASETS synthetic " == *" $lower "* || ! -d $1 ]]; then echo "$lower"
  else basename "$(cd "$1" && pwd -P)"; fi
}
quoted() { local out; printf -v out '%q ' "$@"; echo "${out% }"; }  # one shell-safe line
add_job() {  # METHOD DATASET SHOTS SEED PROTOCOL(fewshot|base2novel|robustness)
  local m=$1 d=$2 k=$3 s=$4 p=$5 sub="" flags=()
  [[ $p == base2novel ]] && { sub="_base2novel"; flags+=(--subsample base); }
  [[ $p == robustness ]] && flags+=(--robustness)
  local dir="$OUT/$(method_dir "$m")/$(dataset_key "$d")/${k}shot$sub/seed$s"
  [[ " ${DATASETS_USED[*]-} " == *" $d "* ]] || DATASETS_USED+=("$d")
  if [[ -f $dir/metrics.json ]]; then
    # a robustness job needs the robustness block; a plain finished run is re-evaluated for it
    if [[ $p != robustness ]] || grep -q '"robustness"' "$dir/metrics.json"; then return; fi
    JOBS+=("$(quoted $PYTHON $m.py --eval-only "$dir" --robustness "${EXTRA[@]+"${EXTRA[@]}"}")")
    return
  fi
  [[ -f $dir/checkpoint.pt ]] && flags+=(--resume)
  JOBS+=("$(quoted $PYTHON $m.py --dataset "$d" --shots "$k" --seed "$s" --out "$OUT" "${flags[@]+"${flags[@]}"}" "${EXTRA[@]+"${EXTRA[@]}"}")")
}

sweep() {  # METHOD PROTOCOL DATASETS SHOTS SEEDS
  local m=$1 p=$2
  [[ $m == biomedap || $m == biomedvr ]] || { echo "error: METHOD must be biomedap or biomedvr, not '$m'" >&2; exit 2; }
  [[ $p == robustness && $m != biomedap ]] && { echo "error: robustness is a BiomedAP evaluation" >&2; exit 2; }
  METHOD_USED=$m
  for d in $3; do for k in $4; do for s in $5; do add_job "$m" "$d" "$k" "$s" "$p"; done; done; done
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
        JOBS+=("$PYTHON $m.py --dataset synthetic --backbone $bb --shots 8 --seed 1 --epochs 5 --device cpu --workers 0 --out $OUT --overwrite")
      done
      JOBS+=("$PYTHON zeroshot.py --dataset synthetic --backbone $bb --device cpu --workers 0 --out $OUT --overwrite")
    done
    run_jobs_smoke() {  # runs land in $OUT/tiny/... and $OUT/tiny-clip/...: one table per backbone
      for job in "${JOBS[@]}"; do echo "+ $job" >&2; eval "$job" | tail -n 3; done
      $PYTHON report.py "$OUT"
      echo "(small random backbones and 5 epochs: accuracies near chance, 25%, are expected; this checks" \
           "that every step runs. Real numbers need BiomedCLIP and a dataset, see README.)"
    }
    if ((DRY)); then printf '%s\n' "${JOBS[@]}"; else run_jobs_smoke; fi ;;
  fewshot|robustness)
    sweep "${POS[1]:-}" "$CMD" "$(pick "${POS[2]:-}" "$ALL_DATASETS")" \
      "$(pick "${POS[3]:-}" "$([[ $CMD == robustness ]] && echo 16 || echo "$ALL_SHOTS")")" \
      "$(pick "${POS[4]:-}" "$ALL_SEEDS")"
    run_jobs ;;
  base2novel)
    sweep "${POS[1]:-}" base2novel "$(pick "${POS[2]:-}" "$ALL_DATASETS")" 16 "$(pick "${POS[3]:-}" "$ALL_SEEDS")"
    run_jobs ;;
  tables)
    case "${POS[1]:-}" in
      biomedap) sweep biomedap fewshot "$ALL_DATASETS" "$ALL_SHOTS" "$ALL_SEEDS"
                sweep biomedap base2novel "$ALL_DATASETS" 16 "$ALL_SEEDS" ;;
      biomedvr) EXTRA=(--cs-anchor fused "${EXTRA[@]+"${EXTRA[@]}"}")  # the released Table-1 loss
                sweep biomedvr fewshot "$ALL_DATASETS" 16 "$ALL_SEEDS" ;;
      *) echo "error: tables needs METHOD: biomedap or biomedvr" >&2; exit 2 ;;
    esac
    run_jobs ;;
  zeroshot)  # the frozen backbone's zero-shot accuracy, the K=0 column of the summary
    for d in $(pick "${POS[1]:-}" "$ALL_DATASETS"); do
      [[ " ${DATASETS_USED[*]-} " == *" $d "* ]] || DATASETS_USED+=("$d")
      [[ -f $OUT/$(backbone_dir)zeroshot/$(dataset_key "$d")/seed1/metrics.json ]] && continue
      JOBS+=("$(quoted $PYTHON zeroshot.py --dataset "$d" --out "$OUT" "${EXTRA[@]+"${EXTRA[@]}"}")")
    done
    run_jobs ;;
  summarize) $PYTHON report.py "${POS[1]:-$OUT}" ;;
  "") usage ;;
  *) echo "error: unknown command '$CMD': use smoke, fewshot, base2novel, robustness, tables, zeroshot or summarize" >&2
     exit 2 ;;
esac
