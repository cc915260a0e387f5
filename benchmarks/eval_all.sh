#!/usr/bin/env bash
# Regenerates every eval artifact that docs/results.md cites, under the issue-14 protocol:
# every system (rag+phi and oracle included), hard retrieval (the whole dev split's supporting
# documents in the pool), paired bootstrap against regrad and regrad+context, drift of the
# deployed weights. One `regrad eval` per dataset; its results.json, report.md and F1 plot are
# copied to $DOCS as <name>-results.json, <name>-report.md, <name>-f1.png and
# <name>-predictions.jsonl.gz (every answer).
#
#   benchmarks/eval_all.sh                      # the published protocol (hours on a CPU)
#   LIMIT=12 DOCS=docs/results/proof benchmarks/eval_all.sh demo   # a quick check of the commands
#
# Arguments: the runs to do (nq-open-dev demo fictional-dev pubmedqa-dev nq-open-dev-init;
# default all).
# Environment: DATA (../shared/data), OUT (runs/eval-all), DOCS (docs/results), LIMIT (overrides
# every run's question count), DEVICE (cpu/cuda), CHECKPOINT (learner: bundled, init or a
# directory), CACHE (runs/eval-cache: eval workspaces and banks, reused across runs), EXTRA
# (more `regrad eval` options, e.g. "--systems rag,rag+phi,regrad").
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/eval-all}
DOCS=${DOCS:-docs/results}
CACHE=${CACHE:-runs/eval-cache}
RUNS=("$@")
[ ${#RUNS[@]} -eq 0 ] && RUNS=(nq-open-dev demo fictional-dev pubmedqa-dev nq-open-dev-init)
mkdir -p "$DOCS" "$OUT"

run() {  # run NAME DEFAULT_LIMIT regrad-eval-args...
    local name=$1 limit=$2
    shift 2
    local lim=()
    if [ -n "${LIMIT:-}" ]; then lim=(--limit "$LIMIT"); elif [ "$limit" != all ]; then lim=(--limit "$limit"); fi
    local extra=()
    [ -n "${DEVICE:-}" ] && extra+=(--device "$DEVICE")
    [ -n "${CHECKPOINT:-}" ] && [ "$name" != nq-open-dev-init ] && extra+=(--checkpoint "$CHECKPOINT")
    # shellcheck disable=SC2206
    [ -n "${EXTRA:-}" ] && extra+=($EXTRA)
    echo "== $name: regrad eval $* ${lim[*]} ${extra[*]} --cache $CACHE --out $OUT/$name" >&2
    regrad eval "$@" "${lim[@]}" "${extra[@]}" --cache "$CACHE" --out "$OUT/$name" > "$OUT/$name.log"
    cp "$OUT/$name/results.json" "$DOCS/$name-results.json"
    cp "$OUT/$name/report.md" "$DOCS/$name-report.md"
    cp "$OUT"/"$name"/*/f1.png "$DOCS/$name-f1.png" 2>/dev/null || true
    # Every answer of every system (what the paired tests resample), compressed.
    gzip -9 -n -c "$OUT"/"$name"/*/predictions.jsonl > "$DOCS/$name-predictions.jsonl.gz"
}

for r in "${RUNS[@]}"; do
    case $r in
        # 150 questions; the pool is every supporting document of the dev split (348 passages).
        nq-open-dev) run nq-open-dev 150 --dataset "nq-open:$DATA/nq_open/nq-open-oracle.jsonl.gz@dev" ;;
        # All 108 bundled questions on the 36 bundled documents (invented facts).
        demo) run demo all --dataset demo ;;
        # Every dev probe (cloze) of the fictional-knowledge documents held out of meta-training.
        fictional-dev) run fictional-dev all --dataset "fictional:$DATA/fictional_knowledge/fictional_knowledge.json@dev" ;;
        # Every dev question (yes/no/maybe; accuracy reported next to F1).
        pubmedqa-dev) run pubmedqa-dev all --dataset "pubmedqa:$DATA/pubmedqa/ori_pqal.json@dev" ;;
        # The same NQ questions with the untrained init learner: what meta-training contributes.
        nq-open-dev-init) run nq-open-dev-init 150 --dataset "nq-open:$DATA/nq_open/nq-open-oracle.jsonl.gz@dev" \
            --checkpoint init --systems closed-book+phi,rag+phi,regrad,regrad+context,oracle,shifted ;;
        *) echo "unknown run $r (use nq-open-dev, demo, fictional-dev, pubmedqa-dev, nq-open-dev-init)" >&2; exit 2 ;;
    esac
done
