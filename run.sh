#!/usr/bin/env bash
# Sweeps and summaries for biomedap.py and biomedvr.py.
#
#   bash run.sh smoke                                   try it: CPU, offline, tiny backbones, < 2 min
#   bash run.sh fewshot    METHOD [DATASETS] [SHOTS] [SEEDS] [--dry-run] [-- FLAGS...]
#   bash run.sh base2novel METHOD [DATASETS] [SEEDS]         [--dry-run] [-- FLAGS...]
#   bash run.sh robustness METHOD [DATASETS] [SHOTS] [SEEDS] [--dry-run] [-- FLAGS...]
#   bash run.sh ablations  METHOD DATASETS [SHOTS] [SEEDS]   [--dry-run] [-- FLAGS...]
#   bash run.sh tables     METHOD|biomedvr-natural           [--dry-run] [-- FLAGS...]
#   bash run.sh zeroshot   [DATASETS]                        [--dry-run] [-- FLAGS...]
#   bash run.sh summarize  [RUNS_DIR]
#
# METHOD is biomedap or biomedvr. SHOTS and SEEDS are quoted lists ("1 2 4" or 1,2,4) or "all"
# for the defaults: shots 1 2 4 8 16 (16 for base2novel, robustness and ablations), seeds 1 2 3
# (1 for ablations: one job per row and dataset; 1,2,3 for three).
# DATASETS is "all" (the 11 medical benchmarks), "natural" (the 7 natural-image ones, in CoOp's
# data folder), one benchmark name or folder path (a path that is a folder is taken whole, spaces
# and all), or a list: separated by commas or newlines when it has any ("btmri,/data/my scans"),
# else by spaces ("btmri busi"). A bare benchmark name is the benchmark; ./btmri is a folder. FLAGS after "--" go to every job (e.g. -- --variant official
# --root /data) and mean the same to the sweep: --out (or --out=) is where it looks for finished
# runs and writes the summary; --backbone, --variant, --cs-anchor, --class-text and the ablation switches pick
# the run folders. `ablations` runs a method's ablation table, one job per row: the full method
# and each component removed (BiomedAP: the fusion, each loss term, the confidence weight, then
# every other low anchor; BioMedVR: L_CS, the second program, the learned gate, and the negative
# expert, which is the AttrVR row); a row's own switches win over FLAGS. `tables` is exactly the
# runs of the published tables: BiomedAP's few-shot table (K=1..16) and base-to-novel table,
# BioMedVR's Table 1 (16 shots, the released loss --cs-anchor fused, on the paper's CLIP ViT-B/16,
# --backbone clip; "-- --backbone biomedclip" runs the same sweep on BiomedCLIP, summarised apart),
# and with biomedvr-natural its Table 3: the natural-image benchmarks, the same protocol.
# Finished runs (metrics.json present) made with the sweep's settings are skipped and unfinished
# ones resumed, so an interrupted sweep continues where it stopped; finished runs made with other
# settings (another --epochs, --lr, ...) stop it before its first job, each named (-- --overwrite
# replaces them, --out keeps both). GPUS="0 1 2 3" runs one job per GPU at a
# time; --dry-run prints the jobs, one command a line (for GNU parallel or a SLURM array).
# Environment: PYTHON (python), OUT (runs; --out after "--" wins), GPUS (empty: one job at a time
# on the default device). A relative dataset path is taken from the folder you run this from, a
# relative output path from this script's folder.
set -euo pipefail
CALLER=$PWD  # relative dataset paths are the caller's
cd "$(dirname "$0")"

PYTHON=${PYTHON:-$(command -v python >/dev/null && echo python || echo python3)}
OUT=${OUT:-runs}
# data.MEDICAL and data.NATURAL, in their order (a test checks that they agree)
MEDICAL_DATASETS="btmri busi chmnist covid ctkidney dermamnist kneexray kvasir lungcolon octmnist retina"
NATURAL_DATASETS="caltech101 food101 dtd eurosat oxford_pets oxford_flowers ucf101"
ALL_SHOTS="1 2 4 8 16"
ALL_SEEDS="1 2 3"

usage() { sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
pick() { if [[ -z "${1:-}" || "$1" == "all" ]]; then echo "$2"; else echo "${1//,/ }"; fi; }
from_caller() {  # DATASET as the jobs, run from this script's folder, must name it: a bare benchmark name
  if is_benchmark "$1" || [[ $1 == /* || ! -d $CALLER/$1 ]]; then echo "$1"  # as it is, a folder
  else (cd "$CALLER" && cd "$1" && pwd); fi                                  # from the caller's folder
}
pick_datasets() {  # DATASETS -> the array DS (see the header for the rules)
  local arg=${1:-all} item i
  DS=()
  if [[ $arg == all ]]; then read -ra DS <<<"$MEDICAL_DATASETS"
  elif [[ $arg == natural ]]; then read -ra DS <<<"$NATURAL_DATASETS"
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

flag_values() {  # FLAG: the values of a list flag (its words after its last use, up to the next --flag)
  local out=() a on=0
  for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do
    if [[ $a == "$1" ]]; then out=(); on=1
    elif [[ $a == "$1="* ]]; then out=("${a#*=}"); on=0
    elif [[ $a == --* ]]; then on=0
    elif ((on)); then out+=("$a"); fi
  done
  echo "${out[*]-}"
}
number() { local n; n=$(LC_ALL=C printf '%g' "$1" 2>/dev/null) && echo "$n" || echo "$1"; }  # Python's format(x, "g")
is_zero() { [[ ${1,,} != none && $(number "$1") =~ ^-?0$ ]]; }

method_dir() {  # where a method's runs go, as runner.run_folder: [<backbone>/][text-<hash>/]biomedap[-official] or
  local m=$1 v t b blocks=()  # biomedvr[-fused], then a suffix per ablation switch off its default
  if [[ $m == biomedap ]]; then
    local variant; variant=$(flag_value --variant paper)
    [[ $variant == official ]] && m=biomedap-official
    v=$(flag_values --fusion-layers)
    if [[ ${v,,} == none ]]; then m+=-no-fusion
    elif [[ -n $v ]]; then
      for b in $v; do [[ $b =~ ^[0-9]+$ ]] && b=$((10#$b)); blocks+=("$b"); done
      m+=-fusion$(IFS=-; echo "${blocks[*]}")
    fi
    v=$(flag_value --low-anchor none)
    [[ $v != none && $v != "$(low_default "$variant")" ]] && m+=-low-$v
    for t in high low kl align; do is_zero "$(flag_value --lambda-$t none)" && m+=-no-$t; done
    is_zero "$(flag_value --alpha 1)" && m+=-no-confidence
  elif [[ $m == biomedvr ]]; then
    [[ $(flag_value --cs-anchor positive) == fused ]] && m=biomedvr-fused
    [[ $(flag_value --experts both) == positive ]] && m+=-positive
    [[ $(number "$(flag_value --programs 2)") == 1 ]] && m+=-shared-program
    [[ $(flag_value --gate learned) == fixed ]] && m+=-fixed-gate
    v=$(flag_value --gate-lr none); [[ ${v,,} != none ]] && m+=-gate-lr$(number "$v")
    is_zero "$(flag_value --beta 0.3)" && m+=-no-cs
  fi
  echo "$(backbone_dir)$TEXT_DIR$m"
}
low_default() { [[ $1 == official ]] && echo minimal || echo prototypes; }  # biomedap.DEFAULT_LOW_ANCHOR

ablation_rows() {  # METHOD: a line per row of its ablation table, the row's own flags (none: the full method)
  local low variant
  if [[ $1 == biomedap ]]; then
    variant=$(flag_value --variant paper)
    printf '%s\n' "" "--fusion-layers none" "--lambda-high 0" "--lambda-low 0" "--lambda-kl 0" "--lambda-align 0"
    [[ $variant == paper ]] && echo "--alpha 0"  # the confidence weight (the official variant has none)
    for low in prototypes minimal article generic medical empty; do
      [[ $low == "$(low_default "$variant")" ]] || echo "--low-anchor $low"
    done
  else  # L_CS, the second program, the learned gate, the negative expert (= AttrVR)
    printf '%s\n' "" "--beta 0" "--programs 1" "--gate fixed" "--experts positive --beta 0"
  fi
}

CLASS_TEXT=$(flag_value --class-text "")  # runs on other class text: text-<8 hex digits of its SHA-256>/
if [[ -n $CLASS_TEXT && ! -f $CLASS_TEXT ]]; then echo "error: --class-text $CLASS_TEXT is not a file" >&2; exit 2; fi
TEXT_DIR=""
[[ -z $CLASS_TEXT ]] || TEXT_DIR="text-$($PYTHON -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest()[:8])' "$CLASS_TEXT")/"
OUT=$(flag_value --out "$OUT")  # the jobs' own --out: where the sweep looks for their runs
OUT_FLAG=(--out "$OUT")          # given to each job, unless the FLAGS after "--" already say it
[[ " ${EXTRA[*]-} " == *" --out "* || " ${EXTRA[*]-} " == *" --out="* ]] && OUT_FLAG=()
OVERWRITE=0; [[ " ${EXTRA[*]-} " == *" --overwrite "* ]] && OVERWRITE=1
JOBS=(); DATASETS_USED=(); METHOD_USED=zeroshot; DS=()
FINISHED=()       # per finished run with recorded arguments: its folder, protocol and training job;
FINISHED_ARGS=()  # and that job's arguments, as their count then the words (runner.finished_runs_cli)

is_benchmark() { local b; for b in $MEDICAL_DATASETS $NATURAL_DATASETS synthetic; do [[ ${1,,} == "$b" ]] && return 0; done; return 1; }
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
  local args=(--dataset "$d" --shots "$k" --seed "$s" "${OUT_FLAG[@]+"${OUT_FLAG[@]}"}" "${flags[@]+"${flags[@]}"}" "${EXTRA[@]+"${EXTRA[@]}"}")
  if [[ -f $dir/metrics.json ]] && grep -q '"args"' "$dir/metrics.json"; then  # settled by compare_finished
    FINISHED+=("$dir" "$p" "$(quoted "$PYTHON" "$m.py" "${args[@]}")")
    FINISHED_ARGS+=("${#args[@]}" "${args[@]}")
    return
  fi
  if [[ -f $dir/metrics.json ]]; then finished_job "$dir" "$p" "$m"; return; fi  # nothing recorded to compare
  [[ -f $dir/checkpoint.pt ]] && ((!OVERWRITE)) && args+=(--resume)
  JOBS+=("$(quoted "$PYTHON" "$m.py" "${args[@]}")")
}

finished_job() {  # DIR PROTOCOL METHOD: a finished run of the sweep's settings is skipped; a robustness
  # job needs the robustness block, so a plain finished run is re-evaluated for it
  if [[ $2 == robustness ]] && ! grep -q '"robustness"' "$1/metrics.json"; then
    JOBS+=("$(quoted "$PYTHON" "$3.py" --eval-only "$1" --robustness "${EXTRA[@]+"${EXTRA[@]}"}")")
  fi
}

compare_finished() {  # the finished runs found, against the sweep's settings (the method's own rule,
  # runner.finished_runs): the same are skipped; others stop the sweep, or with --overwrite train again
  ((${#FINISHED_ARGS[@]})) || return 0
  local answers i conflicts=()
  answers=$(printf '%s\0' "${FINISHED_ARGS[@]}" |
            $PYTHON -c "import runner, $METHOD_USED; runner.finished_runs_cli($METHOD_USED)") || exit 2
  mapfile -t answers <<<"$answers"
  for ((i=0; i<${#answers[@]}; i++)); do
    local dir=${FINISHED[3*i]} protocol=${FINISHED[3*i+1]} job=${FINISHED[3*i+2]}
    case ${answers[i]} in
      same) finished_job "$dir" "$protocol" "$METHOD_USED" ;;
      none) JOBS+=("$job") ;;
      *) if ((OVERWRITE)); then JOBS+=("$job"); else conflicts+=("  $dir: ${answers[i]#differs: }"); fi ;;
    esac
  done
  if ((${#conflicts[@]})); then
    echo "error: ${#conflicts[@]} finished run(s) were made with other settings than this sweep's (made -> asked):" >&2
    printf '%s\n' "${conflicts[@]}" >&2
    echo "pass --overwrite after -- to replace them, or --out to write elsewhere; the sweep did not start" >&2
    exit 2
  fi
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
  compare_finished
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
      biomedvr) EXTRA=(--cs-anchor fused --backbone clip "${EXTRA[@]+"${EXTRA[@]}"}")  # the released loss, the paper's backbone
                pick_datasets all
                sweep biomedvr fewshot 16 "$ALL_SEEDS" ;;
      biomedvr-natural)  # Table 3: the released loss on the paper's backbone; flags after -- still win
                EXTRA=(--cs-anchor fused --backbone clip "${EXTRA[@]+"${EXTRA[@]}"}")
                pick_datasets natural
                sweep biomedvr fewshot 16 "$ALL_SEEDS" ;;
      *) echo "error: tables needs biomedap, biomedvr or biomedvr-natural" >&2; exit 2 ;;
    esac
    run_jobs ;;
  ablations)  # the rows of the method's ablation table, each over DATASETS x SHOTS x SEEDS
    [[ ${POS[1]:-} == biomedap || ${POS[1]:-} == biomedvr ]] || {
      echo "error: ablations needs biomedap or biomedvr, not '${POS[1]:-}'" >&2; exit 2; }
    [[ -n ${POS[2]:-} ]] || { echo "error: ablations needs DATASETS (a benchmark, a list or all)" >&2; exit 2; }
    pick_datasets "${POS[2]}"
    USER_EXTRA=("${EXTRA[@]+"${EXTRA[@]}"}")
    while IFS= read -r row; do
      read -ra ROW <<<"$row"
      EXTRA=("${USER_EXTRA[@]+"${USER_EXTRA[@]}"}" "${ROW[@]+"${ROW[@]}"}")  # the row's switches win
      sweep "${POS[1]}" fewshot "$(pick "${POS[3]:-}" 16)" "$(pick "${POS[4]:-}" 1)"
    done < <(ablation_rows "${POS[1]}")
    EXTRA=("${USER_EXTRA[@]+"${USER_EXTRA[@]}"}")  # the setup check: the flags given
    run_jobs ;;
  zeroshot)  # the frozen backbone's zero-shot accuracy, the K=0 column of the summary
    pick_datasets "${POS[1]:-}"
    for d in "${DS[@]}"; do
      use_dataset "$d"
      [[ -f $OUT/$(backbone_dir)${TEXT_DIR}zeroshot/$(dataset_key "$d")/seed1/metrics.json ]] && continue
      JOBS+=("$(quoted "$PYTHON" zeroshot.py --dataset "$d" "${OUT_FLAG[@]+"${OUT_FLAG[@]}"}" "${EXTRA[@]+"${EXTRA[@]}"}")")
    done
    run_jobs ;;
  summarize) $PYTHON report.py "${POS[1]:-$OUT}" ;;
  "") usage ;;
  *) echo "error: unknown command '$CMD': use smoke, fewshot, base2novel, robustness, ablations, tables, zeroshot" \
          "or summarize" >&2
     exit 2 ;;
esac
