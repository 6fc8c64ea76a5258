"""Train with LAVIS's CLI: ``python train.py --cfg-path PROJECT.yaml [--options k=v ...] [--resume auto]``.

Runs as a plain process or under ``torchrun`` (gloo on CPU, NCCL on GPU). Bad input ends in one line,
``error: ...``, and exit code 2; ``--debug`` (or ``LAVIS_EXT_DEBUG=1``) adds the traceback.
"""
from lavis_ext.cli import main as cli_main


def main(argv=None):
    return cli_main(argv, evaluate=False)


if __name__ == "__main__":
    main()
