# exhaustion: disk (one big file), inodes (many files) and descriptors
import os

try:
    with open("big.bin", "wb") as f:
        for _ in range(4096):
            f.write(b"\0" * (1 << 20))
except OSError:
    pass
try:
    for i in range(100_000):
        open(f"f{i}", "w").close()
except OSError:
    pass
fds = []
try:
    for _ in range(100_000):
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass


def add(a, b):
    return None
