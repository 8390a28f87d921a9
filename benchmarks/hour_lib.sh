# Shared by benchmarks/hour_compare.sh and benchmarks/hour60_compare.sh (sourced after they set RUN and OUT).
DDPMKIT=${DDPMKIT:-.venv/bin/ddpmkit}
mkdir -p "$OUT"
ema() {  # the post-hoc EMA of $RUN at a step ("" or none: the end), of length $2 (default 0.02): a pipeline folder, made once
  local sigma=${2:-0.02}
  local dir="$RUN-ema$sigma${1:+-step$1}"
  [ -d "$dir" ] || $DDPMKIT ema "$RUN" --sigma_rel "$sigma" ${1:+--step $1} --out "$dir" >&2
  echo "$dir"
}
row() {  # name, then eval flags; a row whose JSON exists is skipped (resumable)
  local name=$1; shift
  [ -f "$OUT/$name.json" ] && return
  $DDPMKIT eval --dataset emoji --per_class --num_images 500 --scheduler deis --out "$OUT/$name.json" "$@" \
    2>&1 | tr '\r' '\n' | grep -v '^sampling\|^features\|^ *$' > "$OUT/$name.log"
  grep -E '^FID' "$OUT/$name.log" || tail -5 "$OUT/$name.log"
}
