#!/bin/sh
# Build the runner's C fast path (runner/fastpath.c) as an extension module for PYTHON:
# build-fastpath.sh OUT_DIR [PYTHON]. Used by `make venv` and by packaging/build.sh, so both
# get the same module; without it runners do every run in Python (the same runs, more CPU).
set -e
out=$1
python=${2:-python3}
src=$(dirname "$0")/fastpath.c
include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
suffix=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
case $(${CC:-cc} -dumpmachine) in
x86_64*) cfi=-fcf-protection ;;
aarch64*) cfi=-mbranch-protection=standard ;;
*) cfi= ;;
esac
${CC:-cc} -O2 -Wall -Wextra -Werror -Wno-missing-field-initializers -Wno-cast-function-type -shared -fPIC \
    -fstack-protector-strong -D_FORTIFY_SOURCE=2 $cfi -Wl,-z,relro,-z,now,-z,noexecstack -Wl,--build-id=sha1 -s \
    -ffile-prefix-map="$(dirname "$src")"=. -I"$include" -o "$out/_fastpath$suffix.tmp" "$src"
mv "$out/_fastpath$suffix.tmp" "$out/_fastpath$suffix"
