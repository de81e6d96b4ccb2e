"""Entry script of the frozen `offramp-app` (app/__main__.py imports relatively, so it cannot be one)."""
import multiprocessing
import sys

from app.__main__ import main

if __name__ == "__main__":
    multiprocessing.freeze_support()  # data-loader workers on Windows/macOS start the frozen exe again
    sys.exit(main())
