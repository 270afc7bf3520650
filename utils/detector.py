"""Moved to utils/inference/detector.py; this name stays for existing scripts and notebooks."""
from utils.inference.detector import *  # noqa: F401,F403
