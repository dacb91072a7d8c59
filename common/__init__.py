"""The one piece of code the experiments share: the command line, the run folder and its files."""

from common.cli import DataArgs, RunArgs, UserError, default_data_dir, parse_args, run_main
from common.files import CHECKPOINT_NPZ, CHECKPOINT_PT, load_torch, read_json, save_torch, write_json
from common.runlog import RunLogger, run_name

__all__ = [
    "CHECKPOINT_NPZ",
    "CHECKPOINT_PT",
    "DataArgs",
    "RunArgs",
    "RunLogger",
    "UserError",
    "default_data_dir",
    "load_torch",
    "parse_args",
    "read_json",
    "run_main",
    "run_name",
    "save_torch",
    "write_json",
]
