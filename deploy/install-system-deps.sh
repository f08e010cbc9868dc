#!/usr/bin/env bash
# Installs the real DICOM peers the tests use (dcmtk, dicom3tools, Orthanc with its Python and
# DICOMweb plugins) and, for the status page's browser tests, Chromium and its driver, from
# Debian's packages, only when one is missing.
set -euo pipefail

need=()
command -v /usr/bin/storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancPython.so ] || need+=(orthanc-python)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
# The status page's browser tests drive Debian's Chromium through its chromedriver (Selenium).
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps: missing Debian packages: ${need[*]}" >&2
    echo "install-system-deps: run as root, or: sudo apt-get install -y --no-install-recommends ${need[*]}" >&2
    exit 1
fi
echo "install-system-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${need[@]}"
# Debian's postinst may start a system Orthanc on the default ports; the tests never use it.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now orthanc >/dev/null 2>&1 || true; fi
