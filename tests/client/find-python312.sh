#!/bin/sh
# Print the path of a working Python 3.12 interpreter, or exit 1 saying why not.
# Why the ladder: on these machines `python3.12` is a pyenv shim that refuses
# unless 3.12 is the selected version; the interpreter itself is always there.
for candidate in "python3.12" "env PYENV_VERSION=3.12.1 python3.12" \
    /root/.pyenv/versions/3.12*/bin/python3.12; do
    # shellcheck disable=SC2086  # the candidate is a command with arguments
    found=$($candidate -c 'import sys; assert sys.version_info[:2] == (3, 12); print(sys.executable)' 2>/dev/null) \
        && [ -n "$found" ] && { echo "$found"; exit 0; }
done
echo "no working Python 3.12 (tried python3.12, PYENV_VERSION=3.12.1 python3.12, /root/.pyenv/versions/3.12*/bin/python3.12)" >&2
exit 1
