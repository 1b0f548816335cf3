"""A stranger's flood, run as a process of its own (tests/test_security.py starts it):
``n`` connections to ``host:port`` that reconnect as soon as they are dropped, each
sending a few bytes of garbage (or nothing) and then waiting to be dropped.

    python tests/flood.py HOST PORT N SECONDS

Prints ``started`` once its first n connections were tried, and one JSON line at the
end: connections made, drops seen.
"""
import json
import selectors
import socket
import sys
import time


def main(host, port, n, seconds):
    sel = selectors.DefaultSelector()
    made = dropped = failed = 0

    def open_one():
        nonlocal made, failed
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        except OSError:
            failed += 1
            s.close()
            return
        made += 1
        sel.register(s, selectors.EVENT_READ, made)

    for _ in range(n):
        open_one()
    print("started", flush=True)      # the caller waits for this before it goes on
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key, _ in sel.select(timeout=0.05):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:          # dropped by the hub: come straight back
                sel.unregister(s)
                s.close()
                dropped += 1
                open_one()
        while len(sel.get_map()) < n and time.monotonic() < end:
            open_one()
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    print(json.dumps({"made": made, "dropped": dropped, "failed": failed}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
