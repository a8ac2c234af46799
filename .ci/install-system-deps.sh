#!/usr/bin/env bash
# Debian packages the C++ runtime build needs (.ci/apt-packages.txt). Installs only what is missing,
# and only when it can (root + apt-get); otherwise says so and the C++ tests skip with that reason.
set -euo pipefail
list="$(dirname "$0")/apt-packages.txt"
command -v dpkg >/dev/null 2>&1 || { echo "system deps: no dpkg here; C++ runtime tests will skip"; exit 0; }
missing=()
while read -r pkg; do
  [ -z "$pkg" ] && continue
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done <"$list"
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system deps: missing ${missing[*]} (install them as root: apt-get install ${missing[*]}); C++ runtime tests will skip"
  exit 0
fi
echo "system deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
