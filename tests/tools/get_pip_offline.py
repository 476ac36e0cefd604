# Stand-in for ansible-test's downloaded get-pip bootstrap script (its host is not reachable from our
# machines): installs pip with ensurepip, then the requested packages from the configured package index.
# tests/tools/sanity.sh copies it to ~/.ansible/test/cache/get_pip_<version>.py.
import subprocess
import sys

ARGS = [a for a in sys.argv[1:] if a not in ('--no-setuptools', '--no-wheel')]
subprocess.check_call([sys.executable, '-m', 'ensurepip', '--default-pip'], stdout=subprocess.DEVNULL)
subprocess.check_call([sys.executable, '-m', 'pip', 'install', '-q'] + ARGS)
