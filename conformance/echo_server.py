"""Echo upstream for the conformance run: Python `websockets`, permessage-deflate on.

Usage: python3 echo_server.py PORT
Prints "ready PORT" on stdout once it listens on 127.0.0.1:PORT.
"""

import asyncio
import sys

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


async def echo(ws):
    # Streams each message back fragment by fragment as it arrives (recv_streaming), so a
    # message of 65536 fragments (cases 9.3.1, 9.4.1) is not refused as "too many fragments".
    try:
        while True:
            await ws.send(ws.recv_streaming())
    except ConnectionClosed:
        pass


async def main(port: int) -> None:
    async with serve(
        echo,
        "127.0.0.1",
        port,
        max_size=None,  # cases 9.* send messages of up to 16 MiB
        max_queue=None,
        ping_interval=None,  # no pings of its own: they would show up in the cases' wire logs
        compression="deflate",  # the default, stated: cases 12-13 need permessage-deflate
        write_limit=2**24,
    ):
        print(f"ready {port}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
