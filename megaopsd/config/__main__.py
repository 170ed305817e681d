"""``python -m megaopsd.config [SECTION]``: every config field, its default and its documentation."""

import sys

from megaopsd.config.fields import describe

if __name__ == "__main__":
    print(describe(sys.argv[1] if len(sys.argv) > 1 else None))
