#!/usr/bin/env bash
# ansible-test sanity on a copy of the collection (see TOOLING notes in tests/README.md).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
venv=${VENV:-$repo/.venv}
pipver=$("$venv/bin/python" - <<'PY'
import re, ansible_test, os
src = open(os.path.join(os.path.dirname(ansible_test.__file__), '_internal', 'python_requirements.py')).read()
print(re.search(r"pip='([0-9.]+)'", src).group(1))
PY
)
mkdir -p ~/.ansible/test/cache
cp "$repo/tests/tools/get_pip_offline.py" ~/.ansible/test/cache/get_pip_${pipver//./_}.py
work=${SANITY_WORKDIR:-/tmp/fleetckpt-sanity}
tree=$("$repo/tests/tools/collection-tree.sh" "$work")
cd "$tree"
PATH="$venv/bin:$PATH" ansible-test sanity --venv --python 3.11 --color no "$@"
