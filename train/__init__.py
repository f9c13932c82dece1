"""Thin absl entry points: ``python -m train.<job> --config=configs/<exp>.py --workdir=DIR``."""
