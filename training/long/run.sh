#!/usr/bin/env bash
# The long run (issue 30): the key map trained first order on the answer loss, phi frozen,
# started from the pilot training/km-cached/last, on synthetic (seed 2, 300 entities) and
# fictional-knowledge training questions, with a locality KL on Wikipedia text (NQ-Open *training*
# passages, training/long/locality.txt; `regrad eval` measures drift on the bundled general text).
# The pool is sized so that every document's factors stay in the factor cache (row-scaled float8,
# the MLP input stored once: 5.1 GiB for 475 of the 505 documents at step 168, log.json; about
# twice that in bfloat16; 7 GiB of cache): a
# cached document costs no pass, a missing one a forward+backward (with every document missing,
# as with NQ-Open's 1362 passages, every draw pays that pass). Steps 1-20 ran with a bfloat16 cache.
# From step 614 the pool adds 500 NQ-Open *training* questions (a fixed subset, `@train:500`, sized
# to the cache: ~115 tokens a passage) and the cache grows to 11 GiB; the mix is a third each.
# log.json's config_changes records each such change with its step and pools.
# Run from the repository root; the same command continues the run from training/long/state.pt.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${REGRAD_DATA:-../shared/data}
export MALLOC_ARENA_MAX=2
exec regrad -v meta-train --resume --out training/long \
    --init training/km-cached/last --first-order --freeze-phi --transform-lr 5e-4 --factor-cache-gb 11 --factor-cache-dtype float8 \
    --train synthetic:2:300 \
    --train "fictional:$DATA/fictional_knowledge/fictional_knowledge.json@train" \
    --train "nq-open:$DATA/nq_open/nq-open-oracle.jsonl.gz@train:500" \
    --mix 1,1,1 \
    --dev synthetic:12:12 --dev "fictional:$DATA/fictional_knowledge/fictional_knowledge.json@dev" \
    --dev-limit 48 --eval-every 100 --save-every-s 300 \
    --k 3 --meta-batch 8 --context-mix 0.2 --locality 1.0 --locality-text training/long/locality.txt \
    --steps 3000 "$@"
