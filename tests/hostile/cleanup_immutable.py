# cleanup: files made immutable / append-only, unreadable directories, left in its own tmp
import fcntl
import os
import struct

os.makedirs("keep/deeper", exist_ok=True)
for name, flag in (("keep/immutable", 0x10), ("keep/append", 0x20)):
    with open(name, "w") as f:
        f.write("x")
    try:
        fd = os.open(name, os.O_RDONLY)
        fcntl.ioctl(fd, 0x40086602, struct.pack("i", flag))
    except OSError:
        pass
os.chmod("keep/deeper", 0)
os.chmod("keep", 0o500)


def add(a, b):
    return None
