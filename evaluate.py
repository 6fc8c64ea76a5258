"""Evaluate with LAVIS's CLI: ``python evaluate.py --cfg-path PROJECT.yaml [--options k=v ...]``.

Runs as a plain process or under ``torchrun`` (gloo on CPU, NCCL on GPU). Bad input ends in one line,
``error: ...``, and exit code 2; ``--debug`` (or ``LAVIS_EXT_DEBUG=1``) adds the traceback.
"""
from lavis_ext.cli import main as cli_main


def main(argv=None):
    return cli_main(argv, evaluate=True)


if __name__ == "__main__":
    main()
