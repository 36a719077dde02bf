"""fra's receiver as its own process, as in production (it runs in a node of fra).

``python -m bench.wanrx DEST_URL``: starts a :class:`cluster.receiver.Receiver` for the
sg→fra link against ``DEST_URL``, prints ``ready``, runs until its stdin closes, then
prints one JSON line with the process CPU seconds it used after ``ready`` (not its start
and imports) and exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from cluster.receiver import Receiver

SLOTS = 256


async def _main(dest_url: str) -> None:
    rx = Receiver(region="fra", origin="sg", url=dest_url, node_id="fra/n1", slots=SLOTS)
    rx.start()
    cpu0 = time.process_time()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes it
    await rx.stop()
    print(json.dumps({"cpu_s": time.process_time() - cpu0}), flush=True)


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1]))
