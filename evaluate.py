"""Evaluate with LAVIS's CLI: ``python evaluate.py --cfg-path PROJECT.yaml [--options k=v ...]``.

Runs as a plain process or under ``torchrun`` (gloo on CPU, NCCL on GPU).
"""
from lavis_ext.cli import run


def main(argv=None):
    return run(argv, evaluate=True)


if __name__ == "__main__":
    main()
