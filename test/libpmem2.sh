# shellcheck shell=bash
# Sourced by the test scripts. PMDK's libpmem2 maps mode 1's pmem pools
# (loaded at run time, so only the mode 1 tests need it).
#
# ensure_libpmem2 WHO — installs libpmem2 on Debian when it is missing and
# this runs as root; otherwise says what WHO needs and returns 1.
ensure_libpmem2() {
    if ! ldconfig -p | grep -c 'libpmem2\.so' >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq --no-install-recommends libpmem2 >/dev/null
    fi
    if ! ldconfig -p | grep -c 'libpmem2\.so' >/dev/null; then
        echo "$1: the mode 1 tests need PMDK's libpmem2: apt-get install libpmem2 (as root)" >&2
        return 1
    fi
}
