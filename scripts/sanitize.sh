#!/usr/bin/env bash
# The extension built with AddressSanitizer and UndefinedBehaviorSanitizer (CMake's FASTRANK_SANITIZE=ON) and
# the op tests run against it: an out-of-bounds read or write, a use after free, or undefined behaviour in
# csrc/ stops the run with the sanitizer's report.
#
#   bash scripts/sanitize.sh                 # the op test modules
#   bash scripts/sanitize.sh tests/x.py -k y # or any pytest arguments
#
# The build goes to build/sanitize/ and the tests import a copy of fastrank/ holding the sanitized _C beside
# it, so the installed (editable or not) fastrank is never touched. CPU only: no sanitizer covers CUDA here.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/build/sanitize
PY=${PYTHON:-python}

mkdir -p "$OUT"
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
cmake -S "$ROOT" -B "$OUT/cmake" "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFASTRANK_SANITIZE=ON -DFASTRANK_CUDA=OFF \
      -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
      >"$OUT/configure.log" || { cat "$OUT/configure.log"; exit 1; }
cmake --build "$OUT/cmake" -j "$(nproc)"

# The package copy: this tree's Python sources (never a compiled _C left in them) and the sanitized module.
rm -rf "$OUT/pkg" "$OUT/reports"
mkdir -p "$OUT/pkg" "$OUT/reports" "$OUT/site"
cp -r "$ROOT/fastrank" "$OUT/pkg/"
find "$OUT/pkg/fastrank" \( -name '_C*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
cp "$OUT"/cmake/_C*.so "$OUT/pkg/fastrank/"
# Every Python started below (pytest's workers, tests' subprocesses) imports fastrank from the copy, whatever
# its working directory, and never through an editable install's import hook (first on sys.meta_path).
cat >"$OUT/site/sitecustomize.py" <<'PYTHON'
import importlib.machinery
import os
import sys


class SanitizedFastrank:
    path = [os.environ["FASTRANK_SANITIZED_PKG"]]

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return importlib.machinery.PathFinder.find_spec(name, cls.path) if name == "fastrank" else None


sys.meta_path[:] = [SanitizedFastrank] + [f for f in sys.meta_path if not type(f).__module__.startswith("_editable_")]
PYTHON

# Python itself is not instrumented, so the ASan runtime must be loaded before anything else. Leak checks are
# off: CPython keeps its interned objects and arenas until exit by design. ASan's reports go to files, so one
# from a subprocess whose output a test swallows still fails the run; UBSan's go to stderr whatever its
# log_path says (gcc 12), which pytest leaves alone with --capture=sys (fd capture would take a crashed
# worker's last words with it).
libasan=$(gcc -print-file-name=libasan.so)
libubsan=$(gcc -print-file-name=libubsan.so)
[[ -f $libasan && -f $libubsan ]] || { echo "sanitize: gcc's libasan.so or libubsan.so not found" >&2; exit 1; }
export FASTRANK_SANITIZED_PKG=$OUT/pkg
export PYTHONPATH=$OUT/site${PYTHONPATH:+:$PYTHONPATH}
export LD_PRELOAD="$libasan $libubsan"
export ASAN_OPTIONS="detect_leaks=0:log_path=$OUT/reports/asan:log_exe_name=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

"$PY" -c '
import os
import fastrank._C as C
assert C.__file__.startswith(os.environ["FASTRANK_SANITIZED_PKG"]), f"the tests would import {C.__file__}"
print(f"sanitize: testing {C.__file__}")'

# The tests that drive the extension. Not test_hostile.py (data, index and CLI input): it reaches pytrec_eval,
# which frees with free() what it allocated with new, an ASan alloc-dealloc-mismatch outside fastrank.
if [[ $# -eq 0 ]]; then
  set -- tests/test_maxsim.py tests/test_maxsim_packed.py tests/test_losses.py tests/test_hostile_*.py \
         tests/test_cpu_isa.py tests/test_boundary_safety.py tests/test_fuzz_extension.py
fi
status=0
"$PY" -m pytest -p no:cacheprovider --capture=sys -n 2 -q "$@" || status=$?
if compgen -G "$OUT/reports/*" >/dev/null; then
  echo "sanitize: the sanitizers reported (kept in $OUT/reports):" >&2
  cat "$OUT"/reports/* >&2
  exit 1
fi
exit $status
