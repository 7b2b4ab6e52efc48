"""``python -m utils.report DIR... --out-dir OUT``: run directories -> report.md, summary.csv, figures."""
import sys

from utils.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
