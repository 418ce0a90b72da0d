#!/bin/sh
# Make VENV a virtualenv of PYTHON with stepvisor installed (editable) and EXTRAS.
# Usage: sh scripts/venv.sh PYTHON VENV EXTRAS      e.g. python3 .venv test,ray,bench
#
# The stamp, VENV/.installed-stamp, records what was installed: the extras and
# pyproject.toml's hash.  Nothing is done while it covers what is asked (a
# make target calls this every time, so that must be cheap); otherwise stepvisor
# is installed again with the extras asked for plus those the venv already had.
# Why the union: `make bench` (which adds bench and ray) then `make test` must not
# reinstall on every switch; a venv drops an extra only through `make clean`.
set -eu
python=${1:?usage: venv.sh PYTHON VENV EXTRAS}
venv=${2:?usage: venv.sh PYTHON VENV EXTRAS}
extras=${3:?usage: venv.sh PYTHON VENV EXTRAS}
stamp=$venv/.installed-stamp

words() { echo "$1" | tr ', ' '\n\n' | grep -v '^$' | sort -u | tr '\n' ' '; }

want=$(words "$extras")
hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
have=""
if [ -f "$stamp" ] && [ -x "$venv/bin/python" ]; then
    have=$(words "$(sed -n 's/^extras: //p' "$stamp")")
    missing=""
    for extra in $want; do
        case " $have " in *" $extra "*) ;; *) missing="$missing $extra" ;; esac
    done
    if [ -z "$missing" ] && [ "$(sed -n 's/^pyproject: //p' "$stamp")" = "$hash" ]; then
        exit 0
    fi
fi
all=$(words "$have $want")
list=$(echo "$all" | sed 's/ *$//; s/ /,/g')
echo "installing stepvisor[$list] into $venv ($("$python" --version 2>&1))"
rm -f "$stamp"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$list]"
# Bytecode compiled once here: with PYTHONDONTWRITEBYTECODE set (as on these machines)
# every process child would otherwise compile stepvisor's modules again as it boots.
"$venv/bin/python" -m compileall -q src
printf 'extras: %s\npyproject: %s\n' "$list" "$hash" > "$stamp"
