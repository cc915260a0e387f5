#!/usr/bin/env bash
# The long run (issue 30): the key map trained first order on the answer loss, phi frozen,
# started from the pilot training/km-cached/last, on synthetic + fictional + NQ-Open + PubMedQA
# training questions, with a locality KL on Wikipedia text (NQ-Open *training* passages,
# training/long/locality.txt; the drift measurement of `regrad eval` uses the bundled general text).
# Run from the repository root; the same command continues the run from training/long/state.pt.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${REGRAD_DATA:-../shared/data}
export MALLOC_ARENA_MAX=2
exec regrad -v meta-train --resume --out training/long \
    --init training/km-cached/last --first-order --freeze-phi --transform-lr 5e-4 --factor-cache-gb 5 \
    --train synthetic:2:2000 \
    --train "fictional:$DATA/fictional_knowledge/fictional_knowledge.json@train" \
    --train "nq-open:$DATA/nq_open/nq-open-oracle.jsonl.gz@train" \
    --train "pubmedqa:$DATA/pubmedqa/ori_pqal.json@train" \
    --mix 0.4,0.3,0.2,0.1 \
    --dev synthetic:12:12 --dev "fictional:$DATA/fictional_knowledge/fictional_knowledge.json@dev" \
    --dev-limit 48 --eval-every 100 --save-every-s 300 \
    --k 3 --meta-batch 8 --context-mix 0.2 --locality 1.0 --locality-text training/long/locality.txt \
    --steps 3000 "$@"
