#!/usr/bin/env bash
# make sanitize: the CPU kernels built with AddressSanitizer and UndefinedBehaviorSanitizer
# (every finding fatal), and the test suite run against them. Builds in a copy of the tree
# (build/sanitize) so that the normal build in bpext/ stays as it is.
set -euo pipefail
ROOT=$(pwd)
PY="$ROOT/${VENV:-.venv}/bin/python"
COPY="$ROOT/build/sanitize"

mkdir -p "$COPY"
# The tracked files and the untracked ones git does not ignore, as they are now; a file
# is copied (with a new time stamp, for ninja) only where the copy differs.
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  if [ -f "$f" ] && ! cmp -s "$f" "$COPY/$f"; then mkdir -p "$COPY/$(dirname "$f")"; cp "$f" "$COPY/$f"; fi
done

cd "$COPY"
export BPEXT_FORCE_CPU=1  # CPU kernels only; the build and the tests both read it
BPEXT_SANITIZE=1 BPEXT_SIMD_LEVELS="${BPEXT_SIMD_LEVELS:-native}" MAX_JOBS="${JOBS:-$(nproc)}" "$PY" setup.py -q build_ext --inplace

# Python and torch are not instrumented: the ASan runtime must be loaded first, with
# libstdc++ beside it (its exception interceptors need __cxa_throw at start-up), and leak
# checking is off (the interpreter keeps objects alive until exit by design).
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# The tests below must run on this instrumented build, not on an installed bpext.
"$PY" - "$COPY" <<'PYEOF'
import sys
import bpext
if not bpext._C.__file__.startswith(sys.argv[1]) or "libubsan" not in open("/proc/self/maps").read():
    sys.exit(f"sanitize: loaded {bpext._C.__file__}, not the instrumented build in {sys.argv[1]}")
PYEOF
# --capture=sys: a sanitizer report (written to fd 2 just before the abort) reaches the log.
"$PY" -m pytest -q -m "not slow" --capture=sys -p no:cacheprovider tests "$@"
