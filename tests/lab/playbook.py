# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Drive the collection through real ``ansible-playbook`` runs against the lab, and collect results.

``run_task(inventory, hosts, module, args)`` writes a one-task playbook that runs ``fleetckpt.xen.<module>``,
registers its result, and has the controller save each host's result as JSON; it returns a ``PlayResult``
with the exit code, the per-host results and the output. ``run_tasks`` does the same for several modules in
one run (the benchmark's checkpoint-then-restore). The collection is this checkout, exposed to Ansible
through a symlink tree ``<tmp>/ansible_collections/fleetckpt/xen``.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def collections_path() -> str:
    """A directory that exposes this checkout as the collection fleetckpt.xen (a symlink tree).

    One per checkout (keyed by its path), made atomically: several test processes, and checkouts side by side,
    never flip each other's link.
    """
    key = hashlib.sha256(str(REPO).encode()).hexdigest()[:12]
    top = Path(tempfile.gettempdir()) / ('fleetckpt-collections-%s' % key)
    link = top / 'ansible_collections' / 'fleetckpt' / 'xen'
    if not link.is_symlink() or link.resolve() != REPO:
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.parent / ('.xen-%d' % os.getpid())
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(REPO)
        os.replace(tmp, link)
    return str(top)


@dataclass
class PlayResult:
    rc: int
    results: dict = field(default_factory=dict)
    output: str = ''
    seconds: float = 0.0

    def __getitem__(self, host):
        return self.results[host]

    def ok(self, host) -> bool:
        res = self.results.get(host)
        return res is not None and not res.get('failed') and not res.get('unreachable')


def headline(rc: int, failures: list) -> str:
    """The first line of a run's ``output``: the exit code and each host's failure message, shortened. Tests assert
    with ``res.output`` as the message, and pytest's short summary (the end of a CI log) shows only its first line."""
    text = 'ansible-playbook rc=%d' % rc
    for host, msg in failures:
        msg = ' '.join(str(msg).split())
        text += '; %s: %s' % (host, msg[:400] + ('...' if len(msg) > 400 else ''))
    return text


def _ansible_bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def ansible_env(**extra) -> dict:
    """Environment for ansible-playbook against the lab: this checkout as the collection, lab-friendly settings."""
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections_path(), ANSIBLE_HOST_KEY_CHECKING='False',
               ANSIBLE_NOCOLOR='1', ANSIBLE_RETRY_FILES_ENABLED='False', ANSIBLE_PYTHON_INTERPRETER='auto_silent',
               ANSIBLE_TIMEOUT='60', ANSIBLE_PIPELINING='True', **extra)
    env.setdefault('ANSIBLE_LOCALHOST_WARNING', 'False')
    return env


def playbook_cmd(inventory, path, forks, limit=None, check=False, diff=False, extra_vars=None, tags=None) -> list:
    """The ansible-playbook argv; ``inventory`` is a path or a list of paths."""
    cmd = [_ansible_bin('ansible-playbook')]
    for inv in [inventory] if isinstance(inventory, (str, Path)) else inventory:
        cmd += ['-i', str(inv)]
    cmd += [str(path), '--forks', str(forks)]
    if limit:
        cmd += ['--limit', limit]
    if check:
        cmd.append('--check')
    if diff:
        cmd.append('--diff')
    if extra_vars:
        cmd += ['-e', json.dumps(extra_vars)]
    if tags:
        cmd += ['--tags', ','.join(tags)]
    return cmd


def run_task(inventory: str, hosts: str, module: str, args: dict | None = None, check: bool = False,
             diff: bool = False, timeout: float = 1800, forks: int = 4, extra_vars: dict | None = None) -> PlayResult:
    """One task: ``fleetckpt.xen.<module>`` with ``args`` on ``hosts``; ``results[host]`` is its registered result."""
    res = run_tasks(inventory, hosts, [('result', module, args or {})], check=check, diff=diff, timeout=timeout,
                    forks=forks, extra_vars=extra_vars)
    res.results = {host: steps['result'] for host, steps in res.results.items() if 'result' in steps}
    return res


def run_tasks(inventory: str, hosts: str, steps: list, check: bool = False, diff: bool = False,
              timeout: float = 1800, forks: int = 4, extra_vars: dict | None = None) -> PlayResult:
    """Several module tasks in one ansible-playbook run (one process start instead of one per task).

    ``steps`` is a list of ``(register_name, module, args)``; args may use earlier steps' results in Jinja
    (``"{{ ck.checkpoints[0].id }}"``). A step runs only if every earlier step succeeded on that host.
    ``results[host][register_name]`` is each step's registered result (``skipped`` when it did not run)."""
    names = [name for name, _module, _args in steps]
    if len(set(names)) != len(names):
        raise ValueError('step names must be unique: %s' % names)
    with tempfile.TemporaryDirectory(prefix='fleetckpt-play-') as tmp:
        out_dir = Path(tmp) / 'results'
        out_dir.mkdir()
        tasks = []
        for i, (name, module, args) in enumerate(steps):
            task = {'name': 'Run fleetckpt.xen.%s' % module, 'fleetckpt.xen.%s' % module: args,
                    'register': name, 'ignore_errors': True}
            if i:
                task['when'] = ' and '.join('%s is not failed' % prev for prev in names[:i])
            tasks.append(task)
        tasks += [
            {'name': 'Save the results on the controller', 'ansible.builtin.copy': {
                'content': '{{ {%s} | to_json }}' % ', '.join("'%s': %s" % (n, n) for n in names),
                'dest': '%s/{{ inventory_hostname }}.json' % out_dir},
             'delegate_to': 'localhost', 'check_mode': False},
            {'name': 'Fail when a module failed', 'ansible.builtin.fail': {
                'msg': '{{ [%s] | selectattr("failed", "defined") | selectattr("failed") | map(attribute="msg") '
                       '| first | default("failed") }}' % ', '.join(names)},
             'when': ' or '.join('%s is failed' % n for n in names)},
        ]
        play = [{'name': 'fleetckpt.xen.%s on %s' % ('+'.join(m for _n, m, _a in steps), hosts), 'hosts': hosts,
                 'gather_facts': False, 'tasks': tasks}]
        path = Path(tmp) / 'play.yml'
        path.write_text(json.dumps(play, indent=2))  # JSON is YAML
        cmd = playbook_cmd(inventory, path, forks, check=check, diff=diff, extra_vars=extra_vars)
        env = ansible_env()
        start = time.monotonic()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              check=False)
        results = {}
        for item in out_dir.glob('*.json'):
            results[item.stem] = json.loads(item.read_text())
        failures = [(host, res.get('msg', 'failed')) for host, steps in sorted(results.items())
                    for res in steps.values() if isinstance(res, dict) and res.get('failed')]
        return PlayResult(rc=proc.returncode, results=results, output=headline(proc.returncode, failures) + '\n' + proc.stdout,
                          seconds=round(time.monotonic() - start, 1))


# --- whole playbooks ------------------------------------------------------------------------------------------------
# A tiny callback, enabled next to the default output, that records per host what the tests assert on: the facts the
# roles set (set_fact results), the failures, the tasks that changed something, and the play recap.
_RECORDER = '''
from __future__ import annotations
import json
import os
from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = 'aggregate'
    CALLBACK_NAME = 'fleetckpt_recorder'
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.hosts = {}

    def _host(self, result):
        return self.hosts.setdefault(result._host.get_name(), {'facts': {}, 'failed': [], 'changed': [], 'stats': {}})

    def _record(self, result, failed=False):
        res = result._result
        host = self._host(result)
        items = res['results'] if isinstance(res.get('results'), list) else [res]
        for item in items:
            if isinstance(item, dict) and isinstance(item.get('ansible_facts'), dict):
                host['facts'].update(item['ansible_facts'])
        if failed:
            host['failed'].append({'task': result._task.get_name(), 'msg': str(res.get('msg', ''))})
        elif res.get('changed'):
            host['changed'].append(result._task.get_name())

    def v2_runner_on_ok(self, result):
        self._record(result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, failed=not ignore_errors)

    def v2_runner_on_unreachable(self, result):
        self._host(result)['failed'].append({'task': result._task.get_name(), 'msg': 'UNREACHABLE'})

    def v2_playbook_on_stats(self, stats):
        for name in stats.processed:
            self.hosts.setdefault(name, {'facts': {}, 'failed': [], 'changed': [], 'stats': {}})['stats'] = stats.summarize(name)
        with open(os.environ['FLEETCKPT_RECORDER_OUT'], 'w') as handle:
            json.dump(self.hosts, handle, default=str)
'''


@dataclass
class PlaybookRun:
    """Outcome of ``run_playbook``: exit code, output, and per host the facts set, failures, changed tasks, recap."""
    rc: int
    hosts: dict = field(default_factory=dict)
    output: str = ''
    seconds: float = 0.0

    def facts(self, host) -> dict:
        return self.hosts.get(host, {}).get('facts', {})

    def fact(self, name, host=None):
        """A fact from ``host``, or from whichever host set it (run_once facts are set on every host)."""
        for h, data in self.hosts.items():
            if (host is None or h == host) and name in data.get('facts', {}):
                return data['facts'][name]
        raise KeyError('no host set the fact %s' % name)

    def changed(self, host=None) -> int:
        return sum(d.get('stats', {}).get('changed', 0) for h, d in self.hosts.items() if host is None or h == host)

    def failures(self) -> list:
        return [(h, f) for h, d in self.hosts.items() for f in d.get('failed', [])]


def run_playbook(inventory, path: str, extra_vars: dict | None = None, limit: str | None = None, check: bool = False,
                 diff: bool = False, timeout: float = 1800, forks: int = 5, tags: list | None = None) -> PlaybookRun:
    """Run a whole playbook with the real ``ansible-playbook``.

    ``inventory`` is a path or a list of paths (later ones add hosts or variables); ``path`` is a playbook path or a
    collection playbook name such as ``fleetckpt.xen.checkpoint``; ``extra_vars`` are passed as JSON (typed);
    ``tags`` runs only the tasks with these tags.
    """
    with tempfile.TemporaryDirectory(prefix='fleetckpt-playbook-') as tmp:
        cb_dir = Path(tmp) / 'callbacks'
        cb_dir.mkdir()
        (cb_dir / 'fleetckpt_recorder.py').write_text(_RECORDER)
        out = Path(tmp) / 'recorded.json'
        cmd = playbook_cmd(inventory, path, forks, limit=limit, check=check, diff=diff, extra_vars=extra_vars, tags=tags)
        env = ansible_env(ANSIBLE_CALLBACK_PLUGINS=str(cb_dir), ANSIBLE_CALLBACKS_ENABLED='fleetckpt_recorder',
                          FLEETCKPT_RECORDER_OUT=str(out))
        start = time.monotonic()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              check=False, cwd=str(REPO))
        hosts = json.loads(out.read_text()) if out.exists() else {}
        failures = [(host, '%s: %s' % (f['task'], f['msg'])) for host, data in sorted(hosts.items())
                    for f in data.get('failed', [])]
        return PlaybookRun(rc=proc.returncode, hosts=hosts, output=headline(proc.returncode, failures) + '\n' + proc.stdout,
                           seconds=round(time.monotonic() - start, 1))
