# exhaustion: a (bounded) fork bomb through os.fork, subprocess, multiprocessing and threads
import os
import threading
import time

for attempt in (lambda: os.fork(), lambda: __import__("subprocess").Popen(["sleep", "5"]),
                lambda: __import__("multiprocessing").Process(target=time.sleep, args=(5,)).start(),
                lambda: os.posix_spawn("/bin/sleep", ["sleep", "5"], {})):
    for _ in range(64):
        try:
            if attempt() == 0:
                time.sleep(5)
                os._exit(0)
        except Exception:
            break
threads = []
for _ in range(200):
    try:
        t = threading.Thread(target=time.sleep, args=(5,), daemon=True)
        t.start()
        threads.append(t)
    except Exception:
        break


def add(a, b):
    return len(threads)
