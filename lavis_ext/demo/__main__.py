"""``python -m lavis_ext.demo [--output output/demo]``: see :mod:`lavis_ext.demo.pipeline`."""
from lavis_ext.demo.pipeline import main

if __name__ == "__main__":
    main()
