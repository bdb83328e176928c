"""Network simulation: the `Link` interface, trace-replaying links and virtual time for asyncio.

* `Link` / `TransferTiming`: what the streaming engine needs from a network (``await link.transfer(n)``).
* `SimPyLink`: a throughput `kvcast.traces.Trace` replayed in SimPy virtual time (RTT, payload efficiency,
  per-request overhead, fair sharing among concurrent transfers, exact integration).
* `TimerTraceLink`: the same model on the running loop's own clock (wall-clock emulation).
* `VirtualTimeLoop`: an asyncio event loop whose clock is a SimPy environment, so asyncio code runs in
  virtual time unchanged.
"""

from kvcast.netsim.fair_share import FairShareChannel, Flow
from kvcast.netsim.link import Link, LinkOracle, TransferTiming
from kvcast.netsim.trace_link import SimPyLink, TimerTraceLink, TraceLinkOracle
from kvcast.netsim.virtual_time import VirtualTimeDeadlock, VirtualTimeLoop, run_virtual

__all__ = ["FairShareChannel", "Flow", "Link", "LinkOracle", "SimPyLink", "TimerTraceLink", "TraceLinkOracle",
           "TransferTiming", "VirtualTimeDeadlock", "VirtualTimeLoop", "run_virtual"]
