"""Kernel confinement of an untrusted Python process (Linux): namespaces, Landlock, seccomp, rlimits.

`confine(cfg)` runs inside a freshly started `python -I -S -B` *before* any untrusted code, and
either returns in the confined process or raises `ConfineError`. Steps, in order:

1. `unshare` new user, mount, pid, network, IPC, UTS and cgroup namespaces; the caller's uid/gid
   map to 0 inside, with no capability on anything outside (so host root stays powerless).
   The network namespace has only a down loopback: no network of any kind.
2. Make every mount private and put a fresh size- and inode-limited tmpfs on /tmp: the only
   writable place. It lives in the namespace, so it vanishes, immutable files and all, when
   the last confined process exits; nothing is created on the host. What the process may read
   but the tmpfs would hide (a Python or a venv installed under /tmp) is bind-mounted back at
   its path, read-only.
3. Fork: the child is pid 1 of the new pid namespace (the kernel kills everything it spawned
   when it exits) and dies with its parent (PR_SET_PDEATHSIG). The parent waits and mirrors
   the child's exit status.
4. In the child: rlimits (CPU, address space, file size, open files, processes/threads,
   no core), close every fd but the channel, drop all capabilities, no_new_privs, then
   Landlock (read-only: the standard library without site-packages, libpython and the system's
   shared-library directories; read-write:
   /tmp; a few /dev files; no execute anywhere; from ABI 4 no TCP bind/connect, from ABI 6 no
   signals or abstract unix sockets outside the domain), then a seccomp filter (libseccomp2 through ctypes)
   that refuses sockets, exec, fork (threads are allowed, bounded by RLIMIT_NPROC), ptrace and
   process_vm_*, scheduling/priority/affinity calls, mounts and namespaces, keyrings, bpf,
   perf, io_uring, device nodes, file-flag ioctls (chattr), terminal injection, module and
   kexec calls.

`probe()` says whether all of this works here; the parent side lives in `jaxttt.eval.sandbox`.
This file is also sent verbatim to the sandbox's child process, so it imports only the
standard library; the one system library it needs besides libc is libseccomp2 (Debian
`libseccomp2`, already a dependency of apt and systemd).
"""
import ctypes
import errno
import os
import resource
import select
import signal
import sys

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x20000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x10000000, 0x20000000, 0x40000000
CLONE_THREAD = 0x10000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
# statvfs f_flag bit -> mount flag: the flags a bind mount must keep when remounted read-only
# (a user namespace may not clear the flags its parent's mounts were locked with).
_KEEP_MOUNT_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                     (os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048), (os.ST_RELATIME, 1 << 21))
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT = 444, 445, 446  # all arches
SYS_CAPSET = {"x86_64": 126, "aarch64": 91}

# Landlock access rights (uapi/linux/landlock.h) and the ABI that introduced each
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1, 2, 4, 8
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 16, 32, 64, 128
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK, FS_MAKE_SYM = 256, 512, 1024, 2048, 4096
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2  # ABI 4
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1, 2  # ABI 6
MIN_LANDLOCK_ABI = 1  # the filesystem rules; TCP (ABI 4) and signal scoping (ABI 6) when the
# kernel has them (the network and pid namespaces and seccomp cover both without them)

READ_ONLY = FS_READ_FILE | FS_READ_DIR
READ_WRITE = (FS_WRITE_FILE | FS_READ_FILE | FS_READ_DIR | FS_REMOVE_DIR | FS_REMOVE_FILE
              | FS_MAKE_DIR | FS_MAKE_REG | FS_MAKE_SYM | FS_REFER | FS_TRUNCATE)
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
SYSTEM_LIBS = ("/lib64", "/usr/lib64")  # plus /lib/<multiarch> and /usr/lib/<multiarch>

# seccomp: refused with EPERM (names missing on an architecture are skipped)
DENIED_SYSCALLS = (
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "execve", "execveat", "fork", "vfork", "setsid", "setpgid",
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp",
    "pidfd_open", "pidfd_getfd", "pidfd_send_signal",
    "setpriority", "sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr",
    "ioprio_set", "migrate_pages", "move_pages", "mbind", "set_mempolicy",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "mount_setattr", "open_tree",
    "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "mknod", "mknodat",
    "name_to_handle_at", "open_by_handle_at", "syslog", "vhangup", "uselib", "personality",
    "fanotify_init", "lookup_dcookie", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "sethostname", "setdomainname", "iopl", "ioperm",
)
DENIED_IOCTLS = (
    0x40086602, 0x40046602,  # FS_IOC_SETFLAGS (chattr +i / +a), FS_IOC32_SETFLAGS
    0x401C5820,  # FS_IOC_FSSETXATTR
    0x5412, 0x541C,  # TIOCSTI (inject terminal input), TIOCLINUX
)


class ConfineError(RuntimeError):
    """A confinement step failed: the process must not run untrusted code."""


_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise ConfineError(f"{what}: {os.strerror(e)} (errno {e})")
    return ret


def _syscall(nr: int, *args) -> int:
    _libc.syscall.restype = ctypes.c_long
    return _libc.syscall(ctypes.c_long(nr), *args)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the thread that started it exits (even if that process is
    killed outright), so nothing outlives the evaluation that started it. Linux only."""
    if not sys.platform.startswith("linux"):
        return
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    if os.getppid() != parent_pid:  # it died before PDEATHSIG was armed
        os._exit(137)


# ---- 1-2: namespaces and the private /tmp -------------------------------------------------
def _under_tmp(paths) -> list:
    """The existing paths among `paths` that the private /tmp would hide (a venv in /tmp)."""
    real = {os.path.realpath(p) for p in paths}
    return sorted(p for p in real if p.startswith("/tmp/") and os.path.exists(p))


def _bind_read_only(fd: int, path: str) -> None:
    """Mount what `fd` (opened before the tmpfs hid it) at `path` again, read-only."""
    if os.path.isdir(f"/proc/self/fd/{fd}"):
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    # not MS_REC: a mount below `path` would stay writable (Landlock lets /tmp be written)
    _check(_libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, ctypes.c_ulong(MS_BIND), None),
           f"bind-mount {path}")
    have = os.statvfs(path).f_flag
    keep = sum(ms for st, ms in _KEEP_MOUNT_FLAGS if have & st)
    _check(_libc.mount(None, path.encode(), None, ctypes.c_ulong(MS_BIND | MS_REMOUNT | MS_RDONLY | keep),
                       None), f"remount {path} read-only")


def enter_namespaces(tmp_mb: int, tmp_inodes: int, keep_readable=()) -> None:
    """Steps 1-2. `keep_readable`: paths to read that lie under /tmp stay visible, read-only."""
    uid, gid = os.geteuid(), os.getegid()
    flags = (CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
             | CLONE_NEWUTS | CLONE_NEWCGROUP)
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare(user, mount, pid, net, ipc, uts, cgroup)")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")
    _check(_libc.mount(b"none", b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None), "mount --make-rprivate /")
    kept = [(p, os.open(p, os.O_PATH | os.O_CLOEXEC)) for p in _under_tmp(keep_readable)]
    opts = f"size={tmp_mb}m,nr_inodes={tmp_inodes},mode=0700".encode()
    _check(_libc.mount(b"tmpfs", b"/tmp", b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV | MS_NOEXEC), opts),
           "mount tmpfs on /tmp")
    for path, fd in kept:
        _bind_read_only(fd, path)
        os.close(fd)


def fork_init(keep_fds: tuple) -> None:
    """Fork; return in the child (pid 1 of the new pid namespace); the parent waits, mirrors
    the child's exit status and never returns."""
    alive_r, alive_w = os.pipe()  # the parent holds alive_w: a hang-up means it is gone
    pid = os.fork()
    if pid == 0:
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
        os.close(alive_w)
        gone = select.select([alive_r], [], [], 0)[0]  # the parent died before PDEATHSIG was armed
        os.close(alive_r)
        if gone:
            os._exit(137)
        return
    os.close(alive_r)
    for fd in keep_fds:  # the channel belongs to the child alone: EOF reaches the peer when it dies
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


# ---- 4: limits, fds, capabilities ----------------------------------------------------------
def set_limits(lim: dict, strict: bool = True) -> None:
    """The rlimits of `lim`; with strict=False (unsafe local mode, e.g. macOS) a limit the
    platform refuses is skipped."""
    pairs = ((resource.RLIMIT_CPU, lim["cpu_s"], lim["cpu_s"] + 1),
             (resource.RLIMIT_AS, lim["as_bytes"], lim["as_bytes"]),
             (resource.RLIMIT_FSIZE, lim["fsize_bytes"], lim["fsize_bytes"]),
             (resource.RLIMIT_NOFILE, lim["nofile"], lim["nofile"]),
             (resource.RLIMIT_NPROC, lim["nproc"], lim["nproc"]),
             (resource.RLIMIT_CORE, 0, 0))
    for which, soft, hard in pairs:
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            if strict:
                raise


def close_fds(keep: tuple) -> None:
    """Close every descriptor above stderr except `keep`."""
    lo = 3
    for fd in sorted(keep) + [1 << 20]:
        if fd > lo:
            os.closerange(lo, fd)
        lo = max(lo, fd + 1)


def drop_capabilities() -> None:
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability this kernel knows
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all empty
    nr = SYS_CAPSET.get(os.uname().machine)
    if nr is None:
        raise ConfineError(f"capset: unknown architecture {os.uname().machine}")
    _check(_syscall(nr, header, data), "capset(0)")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")


# ---- 4: Landlock ---------------------------------------------------------------------------
def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is absent or disabled."""
    v = _syscall(SYS_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(0, v)


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # EXECUTE .. MAKE_SYM (ABI 1)
    for bit, since in ((FS_REFER, 2), (FS_TRUNCATE, 3), (FS_IOCTL_DEV, 5)):
        if abi >= since:
            rights |= bit
    return rights


def apply_landlock(read_paths: list, write_paths: list) -> None:
    abi = landlock_abi()
    if abi < MIN_LANDLOCK_ABI:
        raise ConfineError("Landlock is not available in this kernel (needed to confine the filesystem)")
    handled = _fs_rights(abi)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL if abi >= 6 else 0
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8  # struct landlock_ruleset_attr grew with the ABI
    attr = (ctypes.c_uint64 * 3)(handled, net, scoped)
    ruleset = _check(_syscall(SYS_LANDLOCK_CREATE, attr, ctypes.c_size_t(size), ctypes.c_uint32(0)),
                     "landlock_create_ruleset")
    try:
        rules = [(p, READ_ONLY) for p in read_paths] + [(p, READ_WRITE) for p in write_paths]
        rules += [(p, FS_READ_FILE | FS_WRITE_FILE) for p in DEVICES]
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if not os.path.isdir(path):
                    access &= FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE | FS_EXECUTE
                rule = _PathBeneath(access & handled, fd)
                _check(_syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0),
                       f"landlock_add_rule({path})")
            finally:
                os.close(fd)
        _check(_syscall(SYS_LANDLOCK_RESTRICT, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)


# ---- 4: seccomp ----------------------------------------------------------------------------
class _ArgCmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


SCMP_ACT_ALLOW, SCMP_CMP_NE, SCMP_CMP_MASKED_EQ = 0x7FFF0000, 1, 7


def _errno_action(e: int) -> int:
    return 0x00050000 | (e & 0xFFFF)  # SCMP_ACT_ERRNO(e)


def load_libseccomp():
    """libseccomp2 through ctypes (only the five calls used here); ConfineError if absent."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as e:
        raise ConfineError(f"libseccomp2 is not installed ({e})") from None
    lib.seccomp_init.restype, lib.seccomp_init.argtypes = ctypes.c_void_p, [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.argtypes = lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def apply_seccomp(lib) -> None:
    """Load the filter described in the module docstring; unknown names (per arch) are skipped."""
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)  # also kills any other architecture's syscalls
    if not ctx:
        raise ConfineError("seccomp_init failed")

    def rule(action: int, name: str, *cmps: tuple) -> None:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            return  # no such syscall on this architecture
        args = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
        ret = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), args)
        if ret < 0:
            raise ConfineError(f"seccomp rule for {name}: {os.strerror(-ret)}")

    eperm = _errno_action(errno.EPERM)
    try:
        for name in DENIED_SYSCALLS:
            rule(eperm, name)
        rule(eperm, "clone", (0, SCMP_CMP_MASKED_EQ, CLONE_THREAD, 0))  # processes, not threads
        rule(_errno_action(errno.ENOSYS), "clone3")  # flags live in memory; libc falls back to clone
        for request in DENIED_IOCTLS:
            rule(eperm, "ioctl", (1, SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, request))
        rule(eperm, "prlimit64", (0, SCMP_CMP_NE, 0, 0))  # other processes' limits
        ret = lib.seccomp_load(ctx)
        if ret < 0:
            raise ConfineError(f"seccomp_load: {os.strerror(-ret)}")
    finally:
        lib.seccomp_release(ctx)


# ---- the whole sequence ----------------------------------------------------------------------
def read_paths() -> list:
    """What the confined interpreter may read: its standard library (not site-packages), its
    libpython, and the system's shared-library directories."""
    stdlib = os.path.dirname(os.__file__)
    paths = [os.path.join(stdlib, name) for name in os.listdir(stdlib)
             if name not in ("site-packages", "dist-packages")]
    base_lib = os.path.join(sys.base_prefix, "lib")
    if os.path.isdir(base_lib):
        paths += [os.path.join(base_lib, n) for n in os.listdir(base_lib) if n.startswith("libpython")]
    arch = getattr(sys.implementation, "_multiarch", "") or ""
    return paths + [d for d in (*SYSTEM_LIBS, f"/lib/{arch}", f"/usr/lib/{arch}") if arch or d in SYSTEM_LIBS]


def confine(cfg: dict, keep_fds: tuple) -> None:
    """Steps 1-4 above; returns in the confined pid-1 child with cwd /tmp."""
    if not sys.platform.startswith("linux"):
        raise ConfineError(f"no kernel confinement on {sys.platform}")
    lim = cfg["limits"]
    readable = read_paths() + list(cfg.get("extra_read", ()))
    enter_namespaces(lim["tmp_mb"], lim["tmp_inodes"], readable)
    fork_init(keep_fds)
    os.chdir("/tmp")
    set_limits(lim)
    close_fds(keep_fds)
    seccomp = load_libseccomp()  # before Landlock (it reads the library)
    drop_capabilities()
    apply_landlock(readable, ["/tmp"])
    apply_seccomp(seccomp)
