#!/usr/bin/env bash
# Formats `BENCH <case> tokens=T seconds=S tok_s=X` lines (FILE) as a table, with each case's
# throughput relative to the case named REF (when present).
#   scripts/bench-table.sh FILE REF
set -euo pipefail
file=$1 ref_case=$2
ref=$(awk -v c="$ref_case" '$2 == c { sub("tok_s=", "", $5); print $5 }' "$file")
printf '%-32s %8s %10s %10s %8s\n' case tokens seconds tok/s "vs ref"
awk -v ref="$ref" '{
  sub("tokens=", "", $3); sub("seconds=", "", $4); sub("tok_s=", "", $5);
  ratio = (ref != "") ? sprintf("%.2fx", $5 / ref) : "-";
  printf "%-32s %8s %10s %10s %8s\n", $2, $3, $4, $5, ratio
}' "$file"
