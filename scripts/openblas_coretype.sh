#!/usr/bin/env bash
# Prints the OPENBLAS_CORETYPE value to use on this CPU, or nothing when none is needed.
#
# OpenBLAS (Debian 12 ships 0.3.21, built for every x86-64 family and choosing at load time)
# recognises CPUs by model number; on a CPU newer than it knows it may fall back to its generic
# Prescott kernels, about 7x slower at SGEMM on an AVX-512 Xeon. Setting OPENBLAS_CORETYPE to a
# family the CPU supports restores its proper kernels, in every library of the process that uses
# OpenBLAS (PyTorch's matmuls included when it goes through the system BLAS).
#
# This script prints a value only when OpenBLAS, left alone, falls back: it compiles (once, into
# build/) a tiny program printing openblas_get_corename() and runs it without OPENBLAS_CORETYPE.
# The value is the widest family OpenBLAS 0.3.21 knows that /proc/cpuinfo's flags allow (AVX-512
# first, on AMD too: its Zen kernels are AVX2 and run SGEMM at half the speed on Zen 4 and 5):
#   avx512_bf16 (Cooper Lake, Sapphire Rapids on, Zen 4-5)  Cooperlake
#   avx512f, avx512bw, avx512vl, avx512dq                   SkylakeX
#   AMD/Hygon with avx2 (Zen 2-3)                           Zen
#   avx2 and fma                                            Haswell
# and each candidate is checked: it is printed only if OpenBLAS then reports that very core
# (otherwise the next older one is tried). Messages go to stderr; the exit status is 0 unless the
# script itself is misused.
#   scripts/openblas_coretype.sh            the value, or nothing
#   scripts/openblas_coretype.sh --verbose  also says on stderr what it found
set -euo pipefail
cd "$(dirname "$0")/.."

verbose=0
case "${1:-}" in
  "") ;;
  -v|--verbose) verbose=1 ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "openblas_coretype: unknown option $1 (try --help)" >&2; exit 2 ;;
esac
say() { if [ $verbose -eq 1 ]; then echo "openblas_coretype: $*" >&2; fi; }

probe=build/openblas_corename
if [ ! -x "$probe" ]; then
  mkdir -p build
  tmp=$(mktemp build/openblas_corename.XXXXXX)
  if ! printf '%s\n' '#include <stdio.h>' 'char *openblas_get_corename(void);' \
         'int main(void) {' '    puts(openblas_get_corename());' '    return 0;' '}' |
       ${CC:-cc} -x c - -o "$tmp" -lopenblas 2>/dev/null; then
    rm -f "$tmp"
    echo "openblas_coretype: cannot build a program against OpenBLAS (is libopenblas-dev installed?); nothing to set" >&2
    exit 0
  fi
  mv -f "$tmp" "$probe"
fi

# corename [CORETYPE]: what OpenBLAS picks with OPENBLAS_CORETYPE unset or set to CORETYPE.
corename() {
  if [ $# -eq 0 ]; then env -u OPENBLAS_CORETYPE "$probe"; else OPENBLAS_CORETYPE=$1 "$probe"; fi 2>/dev/null
}
# The generic kernels OpenBLAS falls back to (and the pre-SSE3 ones it never uses on x86-64).
is_fallback() {
  case "${1,,}" in
    ""|unknown|*generic*|katmai|coppermine|northwood|prescott|banias|atom|core2|penryn|dunnington) return 0 ;;
    *) return 1 ;;
  esac
}

native=$(corename || true)
if ! is_fallback "$native"; then
  say "OpenBLAS already uses its $native kernels; nothing to set"
  exit 0
fi

vendor=$(grep -m1 '^vendor_id' /proc/cpuinfo 2>/dev/null | sed 's/.*:[[:space:]]*//' || true)
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sed 's/.*://' || true) "
has() { for f in "$@"; do [[ "$flags" == *" $f "* ]] || return 1; done; }

candidates=()
if has avx512_bf16 avx512f avx512bw avx512vl avx512dq; then candidates+=(Cooperlake); fi
if has avx512f avx512bw avx512vl avx512dq; then candidates+=(SkylakeX); fi
if [[ "$vendor" == AuthenticAMD || "$vendor" == HygonGenuine ]] && has avx2; then
  candidates+=(Zen)
fi
if has avx2 fma; then candidates+=(Haswell); fi

for c in "${candidates[@]}"; do
  got=$(corename "$c" || true)
  if [ "${got,,}" = "${c,,}" ]; then
    say "OpenBLAS falls back to $native here; OPENBLAS_CORETYPE=$c gives $got"
    echo "$c"
    exit 0
  fi
  say "OPENBLAS_CORETYPE=$c gives ${got:-nothing}, not $c; trying an older family"
done
say "OpenBLAS falls back to ${native:-nothing} here, and no family fits this CPU; nothing to set"
