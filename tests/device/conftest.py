# Under CPython these modules run in-process; with `--board` the microcot pytest plugin runs
# them on a board instead. Either way they import the firmware as `microcot` and helpers as `dt`.
import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path.insert(0, str(_here))
sys.path.insert(0, str(_here.parents[1] / "firmware"))
