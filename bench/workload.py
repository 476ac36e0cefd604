# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Guest side of the benchmark (copied into each guest it measures and run there with python3; standard library
only).

  workload.py age FRACTION        touch FRACTION of MemAvailable with page-sized data, then exit: free memory
                                  then holds stale non-zero data, as a long-running VM's does ("aged")
  workload.py hold FRACTION       anonymous-memory heavy: a background process holds FRACTION of MemTotal
                                  (at most 60 % of MemAvailable)
  workload.py mkfile PATH MIB     a data file for the page-cache workload (kept if it has the right size)
  workload.py readfile PATH       read it, filling the page cache
  workload.py build start|stop    CPU+IO build-like load in the background (byte-compile, compress, write)
  workload.py stop                stop the background workloads (hold, build)
  workload.py status              which background workloads run
  workload.py meminfo             /proc/meminfo and oom_kill as JSON

Page data: each 4 KiB page is 1 KiB of random bytes and 3 KiB of zeros, so memory compresses about 4:1, like
real guest memory; the data repeats every 16 MiB, a period far beyond zstd's window.
"""
import json
import os
import signal
import sys
import time

PAGE = 4096
RANDOM_PER_PAGE = 1024
BLOCK = 16 << 20
RUN = '/run/fleetckpt-bench'
HELD = []


def meminfo():
    info = {}
    with open('/proc/meminfo') as f:
        for line in f:
            key, _sep, rest = line.partition(':')
            info[key] = int(rest.split()[0])
    with open('/proc/vmstat') as f:
        for line in f:
            if line.startswith('oom_kill '):
                info['oom_kill'] = int(line.split()[1])
    return info


def pages(mib):
    """A bytearray of ``mib`` MiB of page data (see the module docstring): one 16 MiB block of fresh pages,
    repeated (a memory copy: cheap even under emulation)."""
    block = bytearray(BLOCK)
    pool = os.urandom(BLOCK // PAGE * RANDOM_PER_PAGE)
    for i in range(BLOCK // PAGE):
        block[i * PAGE:i * PAGE + RANDOM_PER_PAGE] = pool[i * RANDOM_PER_PAGE:(i + 1) * RANDOM_PER_PAGE]
    size = mib << 20
    buf = bytearray(size)
    for off in range(0, size, BLOCK):
        n = min(BLOCK, size - off)
        buf[off:off + n] = block[:n] if n < BLOCK else block
    return buf


def oom_score_adj(value):
    with open('/proc/self/oom_score_adj', 'w') as f:
        f.write('%d\n' % value)


def age(fraction):
    oom_score_adj(1000)  # if memory runs short, this is the process to kill, not a workload being measured
    # building the data needs about 20 MiB more than it keeps: leave that, and some room, to the rest of the guest
    mib = max(0, int(meminfo()['MemAvailable'] * fraction) // 1024 - 32)
    pages(mib)
    print(json.dumps({'aged_mib': mib}))


def _pidfile(name):
    return os.path.join(RUN, name + '.pid')


def _daemon(name, target):
    """Run ``target()`` in a detached child; its pid goes to RUN/<name>.pid once it is ready."""
    os.makedirs(RUN, exist_ok=True)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.close(ready_r)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        target(lambda: os.write(ready_w, b'1'))
        os._exit(0)
    os.close(ready_w)
    if os.read(ready_r, 1) != b'1':
        sys.exit('%s did not start' % name)
    with open(_pidfile(name), 'w') as f:
        f.write('%d\n' % pid)
    return pid


def hold(fraction):
    info = meminfo()
    # FRACTION of the RAM, but at most 60 % of what is available (building the data needs 20 MiB more): a small guest
    # must keep its sshd and agent
    mib = int(min(info['MemTotal'] * fraction, info['MemAvailable'] * 0.6)) // 1024

    def run(ready):
        HELD.append(pages(mib))  # held until killed
        ready()
        while True:
            signal.pause()
    pid = _daemon('hold', run)
    print(json.dumps({'held_mib': mib, 'pid': pid}))


def build_loop(ready):
    """Byte-compile the standard library into a scratch tree, pack it, repeat: CPU and disk writes."""
    import compileall
    import shutil
    import sysconfig
    import tarfile
    scratch = '/var/tmp/fleetckpt-bench-build'
    ready()
    while True:
        shutil.rmtree(scratch, ignore_errors=True)
        os.makedirs(scratch)
        src = sysconfig.get_paths()['stdlib']
        for name in ('json', 'email', 'http', 'xml', 'logging'):
            shutil.copytree(os.path.join(src, name), os.path.join(scratch, name),
                            ignore=shutil.ignore_patterns('__pycache__'))
        compileall.compile_dir(scratch, quiet=2, force=True)
        with tarfile.open(scratch + '.tar.gz', 'w:gz') as tar:
            tar.add(scratch, arcname='build')
        os.sync()


def _signal(name, sig):
    """Send ``sig`` to the background workload ``name``; False when it has no pid file or is gone."""
    try:
        with open(_pidfile(name)) as f:
            os.kill(int(f.read()), sig)
        return True
    except (OSError, ValueError):
        return False


def status():
    print(json.dumps(dict((name, _signal(name, 0)) for name in ('hold', 'build'))))


def stop(names=('hold', 'build')):
    stopped = []
    for name in names:
        if _signal(name, signal.SIGKILL):
            stopped.append(name)
        if os.path.exists(_pidfile(name)):
            os.unlink(_pidfile(name))
    print(json.dumps({'stopped': stopped}))


def mkfile(path, mib):
    if os.path.exists(path) and os.path.getsize(path) == mib << 20:
        print(json.dumps({'file': path, 'created': False}))
        return
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        for off in range(0, mib, 64):
            f.write(pages(min(64, mib - off)))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    print(json.dumps({'file': path, 'created': True}))


def readfile(path):
    t = time.monotonic()
    with open(path, 'rb') as f:
        while f.read(1 << 20):
            pass
    print(json.dumps({'read_s': round(time.monotonic() - t, 2)}))


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ''
    if cmd == 'age':
        age(float(argv[2]))
    elif cmd == 'hold':
        hold(float(argv[2]))
    elif cmd == 'mkfile':
        mkfile(argv[2], int(argv[3]))
    elif cmd == 'readfile':
        readfile(argv[2])
    elif cmd == 'build' and argv[2:] == ['start']:
        print(json.dumps({'pid': _daemon('build', build_loop)}))
    elif cmd == 'build' and argv[2:] == ['stop']:
        stop(('build',))
    elif cmd == 'stop':
        stop()
    elif cmd == 'status':
        status()
    elif cmd == 'meminfo':
        print(json.dumps(meminfo()))
    else:
        sys.exit(__doc__)


if __name__ == '__main__':
    main(sys.argv)
