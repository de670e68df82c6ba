"""Fit the memory estimate's coefficients to the newest bench/train_speed.py results (CPU, a second).

The newest results are every train_speed result file of the newest date (the 7B presets, the
tutorial recipe, the sizes table), taken together (`studio.train.memory.newest_result_files`).

Every third row is held out of the fit (`studio.train.memory.held_out`); a coefficient no row
measures keeps the value of the fit it replaces; the errors on all rows are printed, and the
coefficients go to studio/train/memory_fit.json, which the studio reads and
tests/test_speed_settings.py checks (within 10% on every row of the newest results).

    python bench/fit_memory.py [--files bench/results/train_speed-h200-DATE.json ...] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT  # noqa: F401  (sets sys.path)

from studio.train.memory import (FIT_FILE, fit, held_out, measurements_of, newest_result_files, predict,  # noqa: E402
                                 unmeasured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=Path, nargs="*", default=None)
    parser.add_argument("--dry-run", action="store_true", help="print, do not write memory_fit.json")
    args = parser.parse_args()
    paths = args.files or newest_result_files(ROOT / "bench" / "results")
    rows = measurements_of(paths)
    fitted_rows = [row for i, row in enumerate(rows) if not held_out(i)]
    earlier = json.loads(FIT_FILE.read_text(encoding="utf-8"))["coefficients"] if FIT_FILE.exists() else None
    coefficients = fit(fitted_rows, earlier)
    kept = [name for name in unmeasured(fitted_rows) if earlier and name in earlier]
    worst = 0.0
    for i, (setup, features, measured) in enumerate(rows):
        estimate = predict(features, coefficients).total_gib
        error = (estimate - measured) / measured
        worst = max(worst, abs(error))
        print(f"{'held out' if held_out(i) else 'fitted  '}  {setup[-90:]:90s} measured {measured:6.2f}  "
              f"estimate {estimate:6.2f}  {error:+.1%}")
    print(f"worst {worst:.1%}; coefficients {coefficients}; kept from the earlier fit (no row measures them): {kept}")
    if not args.dry_run:
        FIT_FILE.write_text(json.dumps({"source": [path.name for path in paths], "held_out": "every third row",
                                        "worst_error": round(worst, 4), "kept_from_earlier_fit": kept,
                                        "coefficients": coefficients}, indent=2) + "\n", encoding="utf-8")
        print("->", FIT_FILE)


if __name__ == "__main__":
    main()
