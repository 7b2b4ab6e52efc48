"""``python -m utils.write_beton``: datasets' own files -> .beton files with their write records (the command lives in ``utils.data.writer``)."""
import sys

from utils.data.writer import main

if __name__ == "__main__":
    sys.exit(main())
