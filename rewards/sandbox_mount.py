"""Build a sandboxed run's filesystem without bubblewrap (root only), then start the run inside it.

Run as root in fresh namespaces (``unshare --mount --pid --fork --net ...``) as
``python -I sandbox_mount.py SPEC -- COMMAND...``, where SPEC is the JSON of
``rewards.sandbox_fs.filesystem_view`` plus ``root`` (an empty staging directory) and ``cwd``. It mounts a
tmpfs on ``root``, creates the parent directories (0755) and symlinks, binds the paths (read-only unless
marked writable), mounts ``/proc`` of the new pid namespace, makes the tmpfs read-only, chroots there and
runs COMMAND as its child. This process is the namespace's init: when it exits, the kernel kills every
process left in the namespace. It imports nothing from the ``rewards`` package.
"""

import ctypes
import json
import os
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


def mount(source, target, fstype, flags, data=None):
    def c(s):
        return None if s is None else s.encode()

    if _libc.mount(c(source), c(target), c(fstype), ctypes.c_ulong(flags), c(data)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


def build(spec):
    root = spec["root"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here may reach the host's namespace
    mount("sandbox", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for d in spec["dirs"]:
        os.makedirs(root + d, mode=0o755, exist_ok=True)
    for link, target in spec["links"]:
        os.symlink(target, root + link)
    for source, target, writable in spec["binds"]:
        inside = root + target
        if os.path.isdir(source):
            os.makedirs(inside, mode=0o755, exist_ok=True)
        else:
            open(inside, "a").close()
        mount(source, inside, None, MS_BIND | MS_REC)
        if not writable:  # a bind mount ignores MS_RDONLY until remounted
            mount(None, inside, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
    os.makedirs(root + "/proc", mode=0o755, exist_ok=True)
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)
    os.chdir(spec["cwd"])


def main():
    spec = json.loads(sys.argv[1])
    command = sys.argv[sys.argv.index("--") + 1 :]
    os.umask(0o022)
    build(spec)
    pid = os.fork()
    if pid == 0:
        os.execv(command[0], command)
    while True:  # as init, reap whatever gets re-parented here until the run itself exits
        done, status = os.wait()
        if done == pid:
            os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
