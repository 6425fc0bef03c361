"""Process 0 waits at a barrier that process 1 never reaches; prints the error line.

python tests/helpers/barrier_probe.py PORT PROCESS_ID
"""

from __future__ import annotations

import sys
import time

from research import parallel

port, process_id = sys.argv[1], int(sys.argv[2])
parallel.initialize_distributed(f"localhost:{port}", 2, process_id, timeout_s=60)
if process_id == 0:
  try:
    parallel.barrier("never_reached_by_1", timeout_s=3)
  except RuntimeError as e:
    print(f"error: {e}", flush=True)
  parallel.barrier("both", timeout_s=60)
else:
  time.sleep(6)  # late for the first barrier, on time for the second
  parallel.barrier("both", timeout_s=60)
