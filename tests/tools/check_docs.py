#!/usr/bin/env python
"""Install the built collection into a temp dir and check that ansible-doc renders every module
(ansible-doc exits 0 even for a missing plugin, so its JSON output is checked)."""
import glob
import json
import os
import subprocess
import sys
import tempfile

bindir = os.path.dirname(sys.executable)
tarball = sorted(glob.glob(os.path.join(sys.argv[1], 'fleetckpt-xen-*.tar.gz')))[-1]
with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([os.path.join(bindir, 'ansible-galaxy'), 'collection', 'install', '-p', tmp, tarball],
                   check=True, stdout=subprocess.DEVNULL)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=tmp)
    # every module the tarball ships (a module left out of this check would go unnoticed)
    MODULES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(
        tmp, 'ansible_collections', 'fleetckpt', 'xen', 'plugins', 'modules', '*.py')) if not p.endswith('__init__.py'))
    if not MODULES:
        sys.exit('no modules found in %s' % tarball)
    bad = []
    for mod in MODULES:
        fqcn = 'fleetckpt.xen.' + mod
        out = subprocess.run([os.path.join(bindir, 'ansible-doc'), '--json', fqcn], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=False)
        try:
            doc = json.loads(out.stdout)[fqcn]['doc']
            assert doc['options'] and doc['short_description']
        except (ValueError, KeyError, AssertionError, TypeError):
            bad.append('%s: %s' % (fqcn, out.stderr.strip()[-300:]))
    if bad:
        sys.exit('ansible-doc failed for:\n' + '\n'.join(bad))
    print('ansible-doc renders %d modules from %s' % (len(MODULES), os.path.basename(tarball)))
