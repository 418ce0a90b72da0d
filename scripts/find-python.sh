#!/bin/sh
# Print the path of a working Python VERSION interpreter (e.g. 3.13), or exit 1 saying why not.
# Usage: sh scripts/find-python.sh VERSION
# Why the ladder: on these machines `python3.13` is a pyenv shim that refuses
# unless 3.13 is the selected version; the interpreter itself is always there.
version=${1:?usage: find-python.sh VERSION, e.g. 3.13}
want=$(echo "$version" | tr '.' ',')
for candidate in "python$version" "env PYENV_VERSION=$version python$version" \
    /root/.pyenv/versions/"$version".*/bin/python"$version" \
    /usr/bin/python"$version" /usr/local/bin/python"$version"; do
    # shellcheck disable=SC2086  # the candidate is a command with arguments
    found=$($candidate -c "import sys; assert sys.version_info[:2] == ($want); print(sys.executable)" 2>/dev/null) \
        && [ -n "$found" ] && { echo "$found"; exit 0; }
done
echo "no working Python $version (tried python$version, PYENV_VERSION=$version python$version, /root/.pyenv/versions/$version.*/bin/python$version, /usr/bin and /usr/local/bin)" >&2
exit 1
