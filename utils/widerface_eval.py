"""Moved to utils/evaluation/widerface_eval.py; this name stays so that `python -m utils.widerface_eval`
and existing imports keep working."""
from utils.evaluation.widerface_eval import *  # noqa: F401,F403
from utils.evaluation.widerface_eval import get_args_parser, main
from utils.errors import run_cli

if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
