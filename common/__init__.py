"""The one piece of code the experiments share: the command line, the run folder and its files."""

from common.cli import DataArgs, RunArgs, UserError, check_fits, clock, default_data_dir, parse_args, run_main
from common.files import (
    CHECKPOINT_NPZ,
    CHECKPOINT_PT,
    existing_file,
    load_npz,
    load_torch,
    read_json,
    read_jsonl,
    save_torch,
    write_json,
)
from common.runlog import RunLogger, run_name

__all__ = [
    "CHECKPOINT_NPZ",
    "CHECKPOINT_PT",
    "DataArgs",
    "RunArgs",
    "RunLogger",
    "UserError",
    "check_fits",
    "clock",
    "default_data_dir",
    "existing_file",
    "load_npz",
    "load_torch",
    "parse_args",
    "read_json",
    "read_jsonl",
    "run_main",
    "run_name",
    "save_torch",
    "write_json",
]
