# Sourced by the set-up scripts: apt helpers shared by every part.
#   apt_install PKG...       install (apt-get update only when the install fails without it)
#   debian_mirror            the system's Debian mirror: deb822 `URIs:` first, then
#                            one-line `deb` entries; comment lines never count
#   ensure_backports SUITE   make SUITE-backports available from that mirror, repairing
#                            the entry an earlier run of ours wrote (ours is the only file
#                            we touch: /etc/apt/sources.list.d/qwen35-mobile-backports.list)
export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=${APT_UPDATED:-0}
APT_ETC=${APT_ETC:-/etc/apt}  # a test points this at a folder of its own
QWEN35_BACKPORTS_LIST=$APT_ETC/sources.list.d/qwen35-mobile-backports.list
# The file a run before this fix wrote (it could hold an unusable snapshot URL).
QWEN35_OLD_BACKPORTS_LIST=$APT_ETC/sources.list.d/bookworm-backports.list

apt_update() {
  [ "$APT_UPDATED" = 1 ] && return 0
  apt-get update -o DPkg::Lock::Timeout=600 -qq >/dev/null || return 1
  APT_UPDATED=1
}

apt_install() {
  [ "$(id -u)" = 0 ] || { echo "as root, run: apt-get install -y $*" >&2; return 1; }
  apt-get install -o DPkg::Lock::Timeout=600 -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
    || { apt_update && apt-get install -o DPkg::Lock::Timeout=600 -y -qq --no-install-recommends "$@" >/dev/null; }
}

# Non-comment source lines of the system, our own backports file excluded.
_system_sources() {
  local f
  for f in "$APT_ETC"/sources.list "$APT_ETC"/sources.list.d/*.list "$APT_ETC"/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    [ "$f" = "$QWEN35_BACKPORTS_LIST" ] && continue
    [ "$f" = "$QWEN35_OLD_BACKPORTS_LIST" ] && grep -q 'qwen35-mobile\|snapshot.debian.org/archive/debian bookworm-backports' "$f" && continue
    grep -vE '^[[:space:]]*(#|$)' "$f" | sed "s|^|$f: |"
  done
}

debian_mirror() {
  local m
  # deb822: "URIs: a b"; a Debian archive (not -security, not -ports).
  m=$(_system_sources | sed -nE 's/^[^:]+\.sources: *URIs:[[:space:]]*//p' | tr ' ' '\n' \
      | grep -E '^https?://[^ ]+/debian/?$' | head -n1 || true)
  if [ -z "$m" ]; then
    m=$(_system_sources | grep -E '\.list: *deb[[:space:]]' | grep -oE 'https?://[^ ]+/debian/?( |$)' \
        | head -n1 | tr -d ' ' || true)
  fi
  m=${m%/}
  echo "${m:-http://deb.debian.org/debian}"
}

ensure_backports() {  # SUITE (bookworm)
  local suite=$1 want
  if _system_sources | grep -qE "(^|[[:space:]])$suite-backports([[:space:]]|$)"; then
    rm -f "$QWEN35_BACKPORTS_LIST"  # the system already has it
  else
    want="# written by qwen35-mobile scripts/lib/apt.sh (the system's Debian mirror)
deb $(debian_mirror) $suite-backports main"
    if [ ! -f "$QWEN35_BACKPORTS_LIST" ] || [ "$(cat "$QWEN35_BACKPORTS_LIST")" != "$want" ]; then
      printf '%s\n' "$want" > "$QWEN35_BACKPORTS_LIST"
      APT_UPDATED=0
    fi
  fi
  # A broken entry an earlier version of this script wrote: repair by removal.
  if [ -f "$QWEN35_OLD_BACKPORTS_LIST" ] && grep -q 'snapshot.debian.org/archive/debian bookworm-backports' "$QWEN35_OLD_BACKPORTS_LIST"; then
    rm -f "$QWEN35_OLD_BACKPORTS_LIST"
    APT_UPDATED=0
  fi
}
