# escape: reach a 127.0.0.1 listener (socket module, raw libc through ctypes, UDP, IPv6, abstract unix)
import ctypes
import socket
import struct

PORT, UDP = __PORT__, __UDP__
for attempt in (
    lambda: socket.create_connection(("127.0.0.1", PORT), timeout=0.5).sendall(b"hello"),
    lambda: socket.create_connection(("::1", PORT), timeout=0.5),
    lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"hello", ("127.0.0.1", UDP)),
    lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect("\0jaxttt-hostile"),
    lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).bind(("0.0.0.0", 0)),
):
    try:
        attempt()
    except Exception:
        pass
try:  # libc socket()/connect() and the raw syscall, past the socket module
    libc = ctypes.CDLL(None, use_errno=True)
    addr = struct.pack("=HH4s8x", socket.AF_INET, socket.htons(PORT), socket.inet_aton("127.0.0.1"))
    for fd in (libc.socket(2, 1, 0), libc.syscall(41, 2, 1, 0)):
        if fd >= 0:
            libc.connect(fd, addr, len(addr))
            libc.write(fd, b"hello", 5)
except Exception:
    pass


def add(a, b):
    return None
