#!/usr/bin/env python3
"""Microticks as an Apache CGI script (README: Apache CGI). It imports
microticks.py beside it, whose compiled form Python keeps in __pycache__:
run as the script itself, its 10,000 lines were compiled on every request."""
import gc

gc.disable()  # while importing: nothing to collect yet, a millisecond saved
import microticks  # noqa: E402

gc.enable()
microticks.main()
