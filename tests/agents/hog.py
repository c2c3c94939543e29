"""Test agent: takes memory 8 MiB at a time, and holds it, until stopped."""

import time

held = []
while True:
    held.append(bytearray(8 << 20))  # touched: bytearray zero-fills its pages
    print(f"holding {len(held) * 8} MiB", flush=True)
    time.sleep(0.02)
