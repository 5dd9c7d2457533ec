#!/usr/bin/env bash
# Time from `git clone` to the first 200 from /predict/ct_classification with `make serve`, in an empty folder (no
# sibling reference folder, an empty BentoML home, a new .venv). Results in docs/performance.md ("Fresh clone").
#   bench/fresh_clone.sh warm                      # pip's cache as it is
#   bench/fresh_clone.sh cold PIP_NO_CACHE_DIR=1   # extra VAR=value pairs go to make's environment
# Needs this checkout's .venv (for the test slice's path); kills the server it started and removes the clone.
set -u
LABEL=$1; shift
SOURCE=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
WORK=$(mktemp -d "/tmp/neuronova-fresh-clone-$LABEL.XXXX")
PORT=${PORT:-3077}
SLICE=$("$SOURCE/.venv/bin/python" -c "from pydicom.data import get_testdata_file as f; print(f('CT_small.dcm'))")
start=$(date +%s.%N)
git clone -q "$SOURCE" "$WORK/repo"
cd "$WORK/repo"
# Each log line is prefixed with the seconds since the clone began (where the time went: install, import, start).
env "$@" BENTOML_HOME="$WORK/bentoml-home" START="$start" setsid bash -c 'make serve PORT='"$PORT"' 2>&1 |
  while IFS= read -r line; do printf "%6.1f %s\n" "$(echo "$(date +%s.%N) - $START" | bc)" "$line"; done' \
  > "$WORK/serve.log" 2>&1 &
server=$!
code=000
while [ "$code" != 200 ] && kill -0 "$server" 2> /dev/null; do
  sleep 1
  code=$(curl -s -o "$WORK/response.json" -w '%{http_code}' -F image=@"$SLICE" -F patient_id=P1 \
         "http://localhost:$PORT/predict/ct_classification")
done
end=$(date +%s.%N)
echo "$LABEL: HTTP $code $(echo "$end - $start" | bc) s after git clone; load average $(cut -d' ' -f1-3 /proc/loadavg)"
grep -o '"predicted_class":"[^"]*"' "$WORK/response.json" | head -1
kill -- -"$server" 2> /dev/null; sleep 3; kill -9 -- -"$server" 2> /dev/null
grep -E "pip install|installed|ensure-demo|bentoml serve|initialized" "$WORK/serve.log" | grep -v WARNING | cut -c1-110
rm -rf "$WORK/repo" "$WORK/bentoml-home"  # ~2.5 GB; the log stays
echo "log: $WORK/serve.log"
