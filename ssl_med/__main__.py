"""``python -m ssl_med ...`` (same as the ``ssl_med`` command).

Also run as a plain file by Lightning when it starts the extra DDP processes of a run (see
:mod:`ssl_med.train.launch`); then this file's folder must not shadow top-level modules.
"""

import sys

if __name__ == "__main__":
    if __spec__ is None:  # run as a file path, not with -m
        sys.path.pop(0)
    from ssl_med.cli import main

    sys.exit(main())
