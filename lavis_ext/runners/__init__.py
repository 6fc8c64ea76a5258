from lavis_ext.runners.runner_ext import RunnerExt

__all__ = ["RunnerExt"]
