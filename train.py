"""Train with LAVIS's CLI: ``python train.py --cfg-path PROJECT.yaml [--options k=v ...] [--resume auto]``.

Runs as a plain process or under ``torchrun`` (gloo on CPU, NCCL on GPU).
"""
from lavis_ext.cli import run


def main(argv=None):
    return run(argv, evaluate=False)


if __name__ == "__main__":
    main()
