#!/bin/sh
# Build the plugin exec helper: build-ar-exec.sh OUT [SOURCE]. Used by `make venv` and by
# packaging/build.sh, so both get the same binary. Static and without libc (see ar_exec.c);
# -fno-stack-protector and no _FORTIFY_SOURCE because both need a libc; no build path in it.
set -e
out=$1
src=${2:-$(dirname "$0")/ar_exec.c}
# control-flow protection is spelt per architecture (gcc refuses -fcf-protection off x86)
case $(${CC:-cc} -dumpmachine) in
x86_64*) cfi=-fcf-protection ;;
aarch64*) cfi=-mbranch-protection=standard ;;
*) cfi= ;;
esac
${CC:-cc} -O2 -Wall -Wextra -Werror -static -nostdlib -ffreestanding -fno-builtin -fno-stack-protector \
    -fno-asynchronous-unwind-tables $cfi -Wl,-z,noexecstack -Wl,--build-id=sha1 -s \
    -ffile-prefix-map="$(dirname "$src")"=. -o "$out.tmp" "$src"
mv "$out.tmp" "$out"
