# Stage runner of bench/device.sh (sourced; tests/test_device_script.py tests it on the CPU).
#
# A stage runs its command under a hard cap: SIGINT at cap - min(GRACE_S, cap / 4) seconds, so that pytest and
# the benchmarks stop like after Ctrl-C and still write their junit XML, summaries and JSON; SIGKILL
# at the cap if the command ignores it. So a stage never takes more than its cap, and a
# script whose caps sum below its total finishes within the total by construction.
#
# Needs: OUT (report folder, with OUT/logs), STAGES (optional subset, space-separated names), OPT_IN (stages
# that run only when STAGES names them).

GRACE_S=${GRACE_S:-15}
# pytest-xdist, interrupted, waits up to 10 s for its workers to exit (execnet's terminate, xdist's EXIT_TIMEOUT)
# before it kills them, and only then writes the junit XML; a worker still importing torch takes SIGINT only
# once the import returns. A pytest-xdist stage needs more grace than that (STAGE_GRACE=$XDIST_GRACE_S).
XDIST_GRACE_S=20

want() {
  if [ -z "${STAGES:-}" ]; then [[ " ${OPT_IN:-} " != *" $1 "* ]]; else [[ " $STAGES " == *" $1 "* ]]; fi
}

# capped CAP LOG CMD... : CMD with stdout+stderr to LOG, SIGINT after CAP - grace s, SIGKILL at
# CAP s; returns CMD's status (124 when it was stopped, 137 when killed). The grace is min(GRACE_S, CAP / 4),
# or STAGE_GRACE when set (at most CAP / 2). `timeout` signals its whole process group (pytest-xdist
# workers too: they start in it). A shell started in the background ignores SIGINT, and its children
# inherit that (Python then installs no KeyboardInterrupt handler): CMD is exec'd with SIGINT restored to
# its default.
capped() {
  local cap=$1 log=$2; shift 2
  local grace=$(( GRACE_S < cap / 4 ? GRACE_S : cap / 4 ))
  [ -n "${STAGE_GRACE:-}" ] && grace=$(( STAGE_GRACE < cap / 2 ? STAGE_GRACE : cap / 2 ))
  local soft=$(( cap - (grace > 0 ? grace : 1) ))
  STAGE_LIMIT=$soft timeout -s INT -k $(( cap - soft )) "$soft" "${PY:-python3}" -c \
    'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' \
    "$@" > "$log" 2>&1
}

# stage NAME CAP CMD... : runs CMD through `capped` (logs/NAME.log), records "name rc seconds cap"
# in stages.tsv and prints the log's tail. STAGE_LIMIT (seconds until SIGINT) is exported to CMD
# so it can size its own budget.
stage() {
  local name=$1 cap=$2; shift 2
  want "$name" || return 0
  echo "== $name (cap ${cap}s)"
  local s rc d log="$OUT/logs/$name.log"
  s=$(date +%s)
  capped "$cap" "$log" "$@"
  rc=$?
  d=$(( $(date +%s) - s ))
  case $rc in
    124) echo "(stopped with SIGINT at its cap: ${cap}s)" >> "$log" ;;
    137) echo "(killed at its cap: it did not stop on SIGINT)" >> "$log" ;;
  esac
  printf "%s\t%s\t%s\t%s\n" "$name" "$rc" "$d" "$cap" >> "$OUT/stages.tsv"
  tail -n 6 "$log" | sed 's/^/   /'
  echo "== $name: rc=$rc in ${d}s"
}
