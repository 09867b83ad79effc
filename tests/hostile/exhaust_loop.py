# exhaustion: an infinite loop inside the call (and one that ignores signals it could catch)
import signal

for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM, signal.SIGXCPU):
    signal.signal(s, signal.SIG_IGN)


def add(a, b):
    while True:
        pass
