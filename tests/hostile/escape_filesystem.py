# escape: create, change or destroy host files through calls with and without audit events
import ctypes
import fcntl
import os
import shutil
import struct

C = "__CANARY__"
attempts = [
    lambda: open(f"{C}/new.txt", "w").write("x"),
    lambda: open(f"{C}/secret.txt", "a").write("tampered"),
    lambda: os.remove(f"{C}/secret.txt"),
    lambda: os.rename(f"{C}/secret.txt", f"{C}/moved.txt"),
    lambda: os.chmod(f"{C}/secret.txt", 0o777),
    lambda: os.utime(f"{C}/secret.txt", (0, 0)),
    lambda: os.truncate(f"{C}/secret.txt", 0),
    lambda: os.mkdir(f"{C}/dir"),
    lambda: os.symlink("/etc/passwd", f"{C}/link"),
    lambda: os.link(f"{C}/secret.txt", f"{C}/hard"),
    lambda: os.mkfifo(f"{C}/fifo"),
    lambda: os.mknod(f"{C}/node"),
    lambda: shutil.rmtree(C),
    lambda: os.setxattr(f"{C}/secret.txt", "user.x", b"1"),
    lambda: __import__("sqlite3").connect(f"{C}/db.sqlite").execute("create table t(x)"),
    lambda: (__import__("readline").add_history("x"), __import__("readline").write_history_file(f"{C}/history")),
    lambda: open(f"/tmp/__MARK__", "w").write("x"),  # the host's /tmp, if it were visible
    lambda: open(os.path.expanduser("~/.__MARK__"), "w").write("x"),
]


def _chattr():  # FS_IOC_SETFLAGS: make the host file immutable (cleanup would then fail)
    fd = os.open(f"{C}/secret.txt", os.O_RDONLY)
    fcntl.ioctl(fd, 0x40086602, struct.pack("i", 0x10))


def _libc():  # open(2)/unlink(2) straight through libc, no audit event
    libc = ctypes.CDLL(None, use_errno=True)
    libc.open(f"{C}/libc.txt".encode(), os.O_CREAT | os.O_WRONLY, 0o644)
    libc.unlink(f"{C}/secret.txt".encode())
    libc.mknod(f"{C}/libcnode".encode(), 0o010644, 0)


for attempt in attempts + [_chattr, _libc]:
    try:
        attempt()
    except Exception:
        pass


def add(a, b):
    return None
