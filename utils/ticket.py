"""``python -m utils.ticket export|show|plain``: lottery tickets as portable files (the command lives in ``utils.lottery.tickets``)."""
import sys

from utils.lottery.tickets import main

if __name__ == "__main__":
    sys.exit(main())
