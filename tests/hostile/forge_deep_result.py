# forging: results too deep or too big to cross (the test side must fail, not crash into a pass)
def add(a, b):
    x = []
    for _ in range(100_000):
        x = [x]
    return x if a % 2 else "x" * (64 << 20)
