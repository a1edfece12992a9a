"""update_touched_rows on one group (group.py), the scattered chunk size alternated in one process.

    python chunk.py L OPTIMIZER ROUNDS BYTES [BYTES ...]
"""
import sys

from group import VARIANTS, timeit
from jaggedrec.ops import fused_rows

sizes = [int(s) for s in sys.argv[4:]]


def with_chunk(size):
    def run():
        saved = fused_rows._SCATTERED_CHUNK_BYTES
        fused_rows._SCATTERED_CHUNK_BYTES = dict.fromkeys(fused_rows.STATE_LAYOUT, size)
        try:
            VARIANTS["current"]()
        finally:
            fused_rows._SCATTERED_CHUNK_BYTES = saved
    return run


for k, v in timeit({f"{s >> 10} kB": with_chunk(s) for s in sizes}, int(sys.argv[3])).items():
    print(f"{k}: {v:.2f} ms")
