"""The one piece of code the experiments share: the command line and the run logger."""

from common.cli import UserError, default_data_dir, parse_args, run_main
from common.runlog import RunLogger, run_name, write_json

__all__ = ["RunLogger", "UserError", "default_data_dir", "parse_args", "run_main", "run_name", "write_json"]
