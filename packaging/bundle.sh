#!/usr/bin/env bash
# `make offline-bundle`: both packages, their SHA256SUMS and a short README in one tarball
# for carrying across an air gap. Reproducible: fixed order, owners, mtimes (SOURCE_DATE_EPOCH,
# as for the packages) and no gzip timestamp.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 1700000000)
fi
OUT=${AR_OUT:-dist}
DEB=$(cd "$OUT" && ls assessment-runtime_*.deb)
RPM=$(cd "$OUT" && ls assessment-runtime-*.rpm)
VERSION=$(/usr/bin/python3.11 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
ARCH=$(dpkg --print-architecture 2>/dev/null || uname -m)
NAME=assessment-runtime-$VERSION-offline-$ARCH
STAGE=build/bundle/$NAME
rm -rf build/bundle
mkdir -p "$STAGE"
cp "$OUT/$DEB" "$OUT/$RPM" "$STAGE/"
(cd "$STAGE" && sha256sum "$DEB" "$RPM" > SHA256SUMS)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@DEB@/$DEB/g" -e "s/@RPM@/$RPM/g" \
    packaging/bundle-README.txt > "$STAGE/README.txt"
chmod 0644 "$STAGE"/*
chmod 0755 "$STAGE"
tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner --format=gnu \
    -C build/bundle -cf - "$NAME" | gzip -n -9 > "$OUT/$NAME.tar.gz"
(cd "$OUT" && sha256sum "$NAME.tar.gz")
