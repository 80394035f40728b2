#!/usr/bin/env bash
# The published comparison tables, each made by one pinned commit, resumable across sessions.
#
#   bash benchmarks/tables.sh [TABLE ...]     # default: every table in QUEUE, in order
#
# Each table's code is the commit its QUEUE line names, checked out (once) as a worktree beside
# this clone with its own .venv, so every row of a table names that commit whatever is committed
# here meanwhile. Each table is one resumable `peftkit compare` (that commit's recipes/) whose
# output is benchmarks/results/<table>/ in THIS clone, the one directory the table has: runs.jsonl
# and configs/ are committed as cells finish (runs/ and logs/ are not), so a later session
# continues where one stopped, retraining only the cell that was cut short. When every cell is
# recorded, `peftkit report benchmarks/results/<table>` writes results.md (.csv, .json, .html,
# plots) beside runs.jsonl. benchmarks/results/README.md says which tables are complete and which
# are in progress (their results.md, if any, older than their runs.jsonl): update it with the table.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
clone="$(cd "$here/.." && pwd)"
results="$here/results"
data="${PEFTKIT_DATA_DIR:-$clone/../shared/data}"

# table | commit | model | task | strategies | seeds | extra compare options
# A table may take two lines when its cells need different options (smollm2-scitldr: lora trains on
# the first 1,000 abstracts, which a session's time allows at fp32; the untuned row trains nothing).
# Cells run in the order listed: quicker ones go where a session's last hour can hold them
# (sst2-chat: ia3 and adapter before qlora, full and dora). smollm2-scitldr's untuned cell is
# rerun after smollm2-dolly (its first record may have counted the GGUF converter's freed
# memory in its baseline; its lora cell stays recorded).
# Every table fixes fp32 (dtype, precision): auto would be bf16 on a CPU with AVX512-BF16 and fp32
# on one without, and a table spans sessions on whichever machine each one gets.
QUEUE="
minilm-wnut17|5ac3250|minilm|wnut17|full,lora|0,1,2|--set dtype=fp32 --set precision=fp32
minilm-squad|c18e3f5|minilm|squad|full,lora,adapter|0|--set dtype=fp32 --set precision=fp32
smollm2-sst2-chat|9da1dc9|smollm2-135m|sst2-chat|none,lora,ia3,adapter,qlora,full,dora,prompt-tuning|0|--set dtype=fp32 --set precision=fp32
smollm2-dolly|76f8349|smollm2-135m|dolly|none,lora,qlora,full|0|--set epochs=1 --set select=last --set dtype=fp32 --set precision=fp32
smollm2-scitldr|9da1dc9|smollm2-135m|scitldr|none|0|--set dtype=fp32 --set precision=fp32
smollm2-scitldr|9da1dc9|smollm2-135m|scitldr|lora|0|--set max_train_samples=1000 --set dtype=fp32 --set precision=fp32
smollm2-sst2|429d97a|smollm2-135m|sst2|full,dora,lora,qlora,ia3,adapter-pfeiffer,prompt-tuning|0|--set max_train_samples=4000 --set dtype=fp32 --set precision=fp32
minilm-rte|429d97a|minilm|rte|full,partial,lora,adapter,bitfit,linear-probe,prompt-tuning|0,1,2|--set dtype=fp32 --set precision=fp32
minilm-sst2|429d97a|minilm|sst2|partial,full,qlora,peft:loha,adapter-houlsby,dora,lora,adapter-pfeiffer,adapter-parallel,bitfit,ia3,prefix-tuning,linear-probe,prompt-tuning|0,1,2|--set dtype=fp32 --set precision=fp32
"


worktree() {  # the pinned commit's checkout, set up once
  local wt="$clone/../peftkit-bench-$1"
  [ -d "$wt" ] || git -C "$clone" worktree add --detach "$wt" "$1" >&2
  [ -x "$wt/.venv/bin/peftkit" ] || bash "$wt/scripts/setup" >&2
  echo "$wt"
}

tables=("$@")
while IFS='|' read -r table commit model task strategies seeds extra; do
  [ -n "$table" ] || continue
  if [ ${#tables[@]} -gt 0 ] && [[ ! " ${tables[*]} " == *" $table "* ]]; then continue; fi
  wt="$(worktree "$commit")"
  echo "== $table at $commit ($(date -u +%H:%M:%S))"
  # Convert a packaged model into the cache before any cell: before ac99485 a cell that did it
  # in its own process counted the converter's freed memory in its baseline (peak ~680 MB low).
  (cd "$wt" && .venv/bin/python -c "from peftkit.models import resolve_model; resolve_model('$model')")
  (cd "$wt" && .venv/bin/peftkit compare --model "$model" --task "$task" --strategies "$strategies" \
     --seeds "$seeds" --recipe-dir recipes --data-dir "$data" --out "$results/$table" ${extra:-})
  echo "== $table: every cell recorded in $results/$table/runs.jsonl; publish it with" \
       "\`peftkit report $results/$table\` and mark it complete in $results/README.md"
done <<< "$QUEUE"
