"""`python -m research.train` whose files may not grow past LIMIT bytes from the save at STEP on.

    python tests/helpers/full_disk.py STEP LIMIT --config=... --workdir=...

RLIMIT_FSIZE makes the kernel fail the checkpoint's writes with EFBIG ("File
too large"), as a full disk fails them with ENOSPC: a real failed write inside
Orbax's background save thread, with no change to the code under test.
"""

from __future__ import annotations

import resource
import sys

from research import checkpoint, train


def main():
  step, limit = int(sys.argv.pop(1)), int(sys.argv.pop(1))
  save = checkpoint.Checkpointer.save

  def save_on_a_full_disk(self, at_step, state, metadata):
    if at_step >= step:
      # Earlier saves finish first: only writes from STEP on meet the full disk (fast
      # steps can reach STEP while the previous save is still writing).
      self._finish()
      resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return save(self, at_step, state, metadata)

  checkpoint.Checkpointer.save = save_on_a_full_disk
  train.run()


if __name__ == "__main__":
  main()
