"""Prepare the demo's real data (task and diverse query pool from the PyPI package `evals`): prints the folder.

Same as `python -m delia.demo_data` or `delia demo-data`; pass --force to rebuild, --out DIR to write elsewhere.
"""

from delia.demo_data import main

if __name__ == "__main__":
    main()
