# escape: a daemon thread that acts after the tests finish (must die with the candidate)
import os
import threading
import time


def later():
    time.sleep(1.0)
    try:
        open("__CANARY__/late.txt", "w").write("x")
    except OSError:
        pass


threading.Thread(target=later, daemon=False).start()


def add(a, b):
    return None
