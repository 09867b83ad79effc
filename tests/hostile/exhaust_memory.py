# exhaustion: memory (one huge allocation, then growth until refused)
blocks = []
try:
    blocks.append(bytearray(8 << 30))
except MemoryError:
    pass
try:
    while True:
        blocks.append(bytearray(16 << 20))
except MemoryError:
    pass


def add(a, b):
    return None
