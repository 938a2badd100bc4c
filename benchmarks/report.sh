#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The benchmark comparison report, as `make bench` runs it:
#   bash benchmarks/report.sh BUILD_DIR [OPTIONS]
# runs BUILD_DIR/benchmarks/attend_report and writes under BUILD_DIR/report/
#   report.txt   the table printed on stdout
#   report.json  Google Benchmark's JSON of every case
#   report.dat   time (ms) against L, one block per variant/path
#   report.png   the same as a log-log plot (needs gnuplot; skipped with a note without it)
# OPTIONS go to attend_report (`--list` names the variants), e.g.
#   make bench ARGS="--variants=causal,top-k --sizes=1024,4096"
#   make bench ARGS="--min-time=0.5 --threads=1"
# except --full, which instead runs every benchmark executable (the full suites, several minutes)
# and writes their JSON to BUILD_DIR/report/full/NAME.json.
set -euo pipefail

if [ $# -lt 1 ] || [ ! -d "$1" ]; then
  echo "usage: bash benchmarks/report.sh BUILD_DIR [--full | attend_report options]" >&2
  exit 2
fi
build_dir=$1
shift
out_dir="$build_dir/report"
mkdir -p "$out_dir"

full=false
args=()
for arg in "$@"; do
  if [ "$arg" = --full ]; then full=true; else args+=("$arg"); fi
done

if $full; then
  mkdir -p "$out_dir/full"
  benches=$(find "$build_dir/benchmarks" -name CMakeFiles -prune -o -type f -perm -u+x -name '*bench_*' -print | sort)
  [ -n "$benches" ] || { echo "attend: no benchmark executables in $build_dir/benchmarks" >&2; exit 1; }
  for bench in $benches; do
    name=$(basename "$bench")
    echo "== $name"
    "$bench" ${args[@]+"${args[@]}"} --benchmark_out="$out_dir/full/$name.json" --benchmark_out_format=json
  done
  echo
  echo "attend: the JSON of every suite is in $out_dir/full/"
  exit 0
fi

report="$build_dir/benchmarks/attend_report"
[ -x "$report" ] || { echo "attend: $report is missing; build the target attend_report first" >&2; exit 1; }
for arg in ${args[@]+"${args[@]}"}; do
  case $arg in --list | --help | -h) exec "$report" "$arg" ;; esac
done

"$report" --json="$out_dir/report.json" --dat="$out_dir/report.dat" ${args[@]+"${args[@]}"} |
  tee "$out_dir/report.txt"

written=("$out_dir/report.txt" "$out_dir/report.json" "$out_dir/report.dat")
rm -f "$out_dir/report.png"  # never leave the plot of an earlier run
if ! grep -q '^# series ' "$out_dir/report.dat"; then
  echo "attend: no case finished, so no plot (report.png)" >&2
elif command -v gnuplot >/dev/null 2>&1; then
  # One line per variant/path: the titles come from the "# series NAME" line of each block.
  titles=$(sed -n 's/^# series //p' "$out_dir/report.dat" | tr '\n' ' ')
  count=$(wc -w <<<"$titles")
  heading=$(head -n 1 "$out_dir/report.txt" | sed "s/'/ /g")
  if gnuplot <<EOF; then
set terminal pngcairo size 1400,900 noenhanced font ",11"
set output '$out_dir/report.png'
set title "$heading\ntime per call against L (log-log)"
set logscale xy
set xlabel 'L (sequence length; keys for decode)'
set ylabel 'milliseconds per call'
set grid
set key outside right top
titles = '$titles'
plot for [i = 1:$count] '$out_dir/report.dat' index (i - 1) using 1:2 with linespoints lw 2 \
  pt ((i - 1) % 12 + 1) dt 1 + (i - 1) / 8 title word(titles, i)
EOF
    written+=("$out_dir/report.png")
  else
    rm -f "$out_dir/report.png"
    echo "attend: gnuplot failed; no plot (report.png) this time" >&2
  fi
else
  echo "attend: gnuplot is not installed, so no plot (report.png); install it with" \
    "'bash cmake/install-dependencies.sh --bench' or 'apt-get install gnuplot-nox'" >&2
fi

echo
echo "attend: the report is in $out_dir/:"
for file in "${written[@]}"; do echo "  $file"; done
